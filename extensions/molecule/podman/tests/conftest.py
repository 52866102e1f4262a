import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "_shared"))

import podman_exec  # noqa: E402  (found through the path above)

podman_exec.install()
