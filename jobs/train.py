"""Entrypoint for `ray job submit`: train a config's jobs on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/train.py configs/demo.yaml --output /mnt/rayft/demo

Inside a Ray job RAY_ADDRESS is set, so `rayft train` connects to the cluster instead of starting
an embedded one. Exits non-zero when a job fails.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from rayft.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
