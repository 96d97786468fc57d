"""Entrypoint for `ray job submit`: queue a config's jobs on the cluster's controller and follow them.

    ray job submit --working-dir . -- python jobs/train.py configs/demo.yaml --storage /mnt/rayft

Inside a Ray job RAY_ADDRESS is set, so this connects to the cluster; the controller is started
if absent (with --storage as its root). Progress streams to the job's log; the exit code is
non-zero when a job fails or is cancelled.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from rayft.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["submit", "--wait", "--attach", *sys.argv[1:]]))
