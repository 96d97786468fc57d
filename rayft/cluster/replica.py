"""The replica: a Ray actor holding one base-model copy and running fused steps for its jobs.

Thin on purpose: all the work is `rayft.train.Trainer`; this file only places it on a GPU (or on
CPUs) and returns plain, serialisable progress to the driver.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ray

from rayft.config import RunConfig


class ReplicaWorker:
    def __init__(self, cfg: RunConfig, output_dir: str, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        from rayft.train.trainer import Trainer

        self.trainer = Trainer(cfg, Path(output_dir))
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def status(self) -> list[dict]:
        out = []
        for st in self.trainer.status.values():
            d = dataclasses.asdict(st)
            d["tokens_per_s"] = st.tokens_per_s
            out.append(d)
        return out

    def step(self, n: int = 1) -> dict:
        """Up to n fused steps; returns the jobs' status and the fused throughput of these steps."""
        tokens, pad, seconds = 0, 0, 0.0
        for _ in range(n):
            stats = self.trainer.step()
            if stats is None:
                break
            tokens, pad, seconds = tokens + stats.tokens, pad + stats.pad_tokens, seconds + stats.seconds
        return {
            "jobs": self.status(),
            "running": len(self.trainer.running),
            "tokens": tokens,
            "seconds": seconds,
            "padding": pad / max(1, tokens + pad),
            "device": str(self.trainer.engine.device),
            "pid": os.getpid(),
        }

    def evaluate(self) -> dict:
        return self.trainer.evaluate()


def start_replica(cfg: RunConfig, output_dir: str | Path, name: str = "rayft-replica-0"):
    """Start a replica actor: one GPU where the config asks for CUDA, else every CPU of the node."""
    from rayft.model.load import resolve_device

    if resolve_device(cfg.base_model) == "cuda":
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = None
    else:
        # one node's CPUs (an actor cannot span nodes): the largest alive node's
        cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])
        options = {"num_cpus": cpus}
        threads = cpus
    actor = ray.remote(ReplicaWorker).options(name=name, namespace="rayft", max_concurrency=1, **options)
    return actor.remote(cfg, str(Path(output_dir).resolve()), threads)
