"""Per-job checkpoints, written atomically: a temp directory renamed to ckpt-<step>.

A checkpoint holds the adapter weights (safetensors) and everything else the job's future depends
on (state.pt: optimizer, schedule, data cursor, dropout RNG, counters). The newest complete one wins;
older ones are removed after a new one lands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft import layout
from rayft.atomic import atomic_dir
from rayft.train.job import Job


def job_checkpoint_dir(root: str | Path, job: str) -> Path:
    return Path(root) / layout.checkpoints(job)


def save_checkpoint(job: Job, root: str | Path, keep: int = 1) -> Path:
    folder = job_checkpoint_dir(root, job.name)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / layout.checkpoint_name(job.step)
    with atomic_dir(final) as tmp:
        weights = {k: v.contiguous().cpu() for k, v in job.am.adapter_state(job.adapter.name).items()}
        save_file(weights, str(tmp / "adapter.safetensors"))
        torch.save(job.state_dict(), tmp / "state.pt")
    done = sorted(p for p in folder.iterdir() if layout.CHECKPOINT_NAME.match(p.name))
    for old in done[: len(done) - max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path, job: str) -> Path | None:
    folder = job_checkpoint_dir(root, job)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if layout.CHECKPOINT_NAME.match(p.name) and (p / "state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(job: Job, path: str | Path) -> None:
    path = Path(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state["job"] != job.name:
        raise ValueError(f"{path}: checkpoint of job {state['job']!r}, not {job.name!r}")
    job.am.load_adapter_state(job.adapter.name, load_file(str(path / "adapter.safetensors")))
    job.load_state_dict(state)
