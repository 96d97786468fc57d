"""Per-job checkpoints, written atomically: a temp directory renamed to ckpt-<step>.

A checkpoint holds the adapter weights (safetensors) and everything else the job's future depends
on (state.pt: optimizer, schedule, data cursor, dropout RNG, counters). The newest complete one wins;
older ones are removed after a new one lands.

state.pt is read with torch's weights-only unpickler: anyone who can write to the storage root must
not be able to run code on every replica that resumes a job, so it may hold only tensors and plain
data (what Job.state_dict writes), and anything else is refused.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft import layout
from rayft.adapters.peft_format import check_finite
from rayft.atomic import atomic_dir
from rayft.train.job import Job

STATE_FILE = "state.pt"
WEIGHTS_FILE = "adapter.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def job_checkpoint_dir(root: str | Path, job: str) -> Path:
    return Path(root) / layout.checkpoints(job)


def save_checkpoint(job: Job, root: str | Path, keep: int = 1) -> Path:
    weights = {k: v.contiguous().cpu() for k, v in job.am.adapter_state(job.adapter.name).items()}
    return write_checkpoint(root, job.name, job.step, weights, job.state_dict(), keep)


def write_checkpoint(root: str | Path, job: str, step: int, weights: dict[str, torch.Tensor], state: dict,
                     keep: int = 1) -> Path:
    """Write a job's checkpoint from its adapter weights (keyed as `AdapterModel.adapter_state`) and
    its `Job.state_dict`: what `save_checkpoint` writes, and what a staged replica writes from the
    shards of all its stages."""
    folder = job_checkpoint_dir(root, job)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / layout.checkpoint_name(step)
    check_finite(weights, final)
    with atomic_dir(final) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
    done = sorted(p for p in folder.iterdir() if layout.CHECKPOINT_NAME.match(p.name))
    for old in done[: len(done) - max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path, job: str) -> Path | None:
    folder = job_checkpoint_dir(root, job)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if layout.CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def read_state(path: str | Path) -> dict:
    """A checkpoint's state.pt, refused (CheckpointError naming the file) unless it is plain data."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: refused: it holds more than tensors and plain data, and loading it "
                              f"would run code from the storage root ({first[:300]})") from None
    if not isinstance(state, dict) or "job" not in state:
        raise CheckpointError(f"{file}: not a rayft checkpoint state (no 'job' entry)")
    return state


def load_checkpoint(job: Job, path: str | Path) -> None:
    path = Path(path)
    state = read_state(path)
    if state["job"] != job.name:
        raise CheckpointError(f"{path}: checkpoint of job {state['job']!r}, not {job.name!r}")
    job.am.load_adapter_state(job.adapter.name, load_file(str(path / WEIGHTS_FILE)))
    job.load_state_dict(state)
