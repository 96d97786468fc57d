"""Where a run's files go, relative to its directory: one definition for training, the storage
root and the server. stdlib only, below every layer.

    <run>/checkpoints/<job>/ckpt-<step, 8 digits>/
    <run>/adapters/<adapter>/                       PEFT format
    <storage root>/registry.sqlite                   the cluster's job registry
    <storage root>/jobs/<job id>/                    a cluster job's run directory
    <root>/compressed/<store>/                       adapters in one subspace (`rayft compress`):
                                                     subspace.json + basis.safetensors
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# \Z, not $ (which matches before a trailing newline); [0-9], not \d (which takes any script's digits)
SUBSPACE_META, SUBSPACE_BASIS = "subspace.json", "basis.safetensors"  # a compressed store's two files
REGISTRY = "registry.sqlite"  # a cluster storage root's job registry, at its top
CHECKPOINT_NAME = re.compile(r"ckpt-([0-9]{8})\Z")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def checkpoints(job: str) -> PurePosixPath:
    return PurePosixPath("checkpoints", job)


def adapter(name: str) -> PurePosixPath:
    return PurePosixPath("adapters", name)


def job(job_id: str) -> PurePosixPath:
    return PurePosixPath("jobs", job_id)


def compressed(store: str) -> PurePosixPath:
    return PurePosixPath("compressed", store)
