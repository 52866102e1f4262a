# SPDX-License-Identifier: GPL-3.0-or-later
import sys

from bench.run import main

sys.exit(main())
