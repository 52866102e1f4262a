# SPDX-License-Identifier: GPL-3.0-or-later
"""`make bench`: our lock daemon against Debian's C virtlockd.

Both daemons are started on private sockets by `testbed/daemons.py`
(socket activation, same virtlockd.conf) and driven by the same forked,
multi-process load generator (`bench.loadgen`) that sends precomputed frames
over raw sockets. Scenarios live in `bench.scenarios`, the table, goals,
markdown and chart in `bench.report`, the driver in `bench.run`.

    python -m bench            # full run, about 10 minutes
    python -m bench --quick    # every scenario with tiny counts, under a minute
"""
