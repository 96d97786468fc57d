"""The replica: a Ray actor holding one base-model copy and running fused steps for its jobs.

Thin on purpose: all the work is `rayft.train.Trainer`; this file places it on a GPU (or on CPUs)
and returns plain, serialisable progress. Two uses:

- `rayft train`: one replica built from a whole config, writing under one output directory;
- the controller's replicas: jobs arrive and leave one at a time (`add_job`, `remove_job`), each
  named by its job id and writing under `<storage root>/jobs/<job id>/`. The base model is loaded
  with the first job, and swapped only when the replica is empty.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ray

from rayft.config import RunConfig
from rayft.states import JobState


class ReplicaWorker:
    """A whole replica, or with `stage` (index, count) one stage actor of a staged replica
    (`rayft.cluster.staged`): its trainer is then made once `connect` has joined the stages'
    process group and said which layers this stage holds."""

    def __init__(self, cfg: RunConfig | None, output_dir: str, num_threads: int | None = None,
                 storage_token: str | None = None, stage: tuple[int, int] | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        from rayft.store.storage import Storage

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.storage = Storage(output_dir)
        if storage_token is not None:  # a controller's replica: refuse a root this node cannot see
            self.storage.check_marker(storage_token, self.node)
        self.stage_at, self.stage = stage, None
        self.trainer = None
        self._cfg, self._output = cfg, Path(output_dir)
        if stage is None and cfg is not None:
            self._start_trainer()

    def _start_trainer(self) -> None:
        from rayft.train.trainer import Trainer

        # `rayft train` has no controller to requeue an out-of-memory job smaller: its trainer does
        self.trainer = Trainer(self._cfg, self._output, retry_out_of_memory=self.stage is None, stage=self.stage)

    # ---- a stage of a staged replica ------------------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) of this node for the stages' process group (asked of stage 0)."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node_id(self) -> str | None:
        return self.node

    def pid(self) -> int:
        return os.getpid()

    def connect(self, address: str, port: int, backend: str, layers: tuple[int, int]) -> None:
        """Join the stages' torch.distributed group (rank = stage index) holding decoder layers
        [start, stop); then load this stage."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        from rayft.model.stages import StageSpec
        from rayft.train.staged import Stage, StageLinks

        (index, count), (start, stop) = self.stage_at, layers
        device = "cuda" if backend == "nccl" else "cpu"
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray gives each stage actor one GPU
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=index, world_size=count,
                                timeout=timedelta(minutes=10))
        spec = StageSpec(index, count, range(start, stop))
        self.stage = Stage(spec, StageLinks(spec, device))
        if self._cfg is not None:
            self._start_trainer()

    # ---- the controller's side ---------------------------------------------------------------------

    def add_job(self, job_id: str, cfg_json: str) -> dict:
        """Add one job (its own RunConfig) under its id; resumes from its newest checkpoint."""
        from rayft.train.trainer import JobStatus, Trainer

        cfg = RunConfig.model_validate_json(cfg_json)  # one job's config, as the registry keeps it
        job, adapter = cfg.jobs[0], cfg.adapters[0]
        # the job id names the job and its adapter here: unique, unlike names across resubmissions
        cfg = cfg.model_copy(update={
            "jobs": [job.model_copy(update={"name": job_id, "adapter": job_id})],
            "adapters": [adapter.model_copy(update={"name": job_id})],
        })
        try:
            if self.trainer is not None and self.trainer.base_model != cfg.base_model:
                if self.trainer.jobs:
                    raise ValueError(f"replica holds {self.trainer.base_model.path} with jobs; job needs {cfg.base_model.path}")
                self.trainer = None  # empty: swap the base model
            if self.trainer is None:
                from rayft.model.load import ensure_model

                ensure_model(cfg.base_model)
                self.trainer = Trainer(cfg.base_model, self.storage.local,
                                       on_saved=lambda name, out: self.storage.push_job(name), stage=self.stage)
            self.storage.pull_job(job_id)
            st = self.trainer.add_job(cfg.jobs[0], cfg, self.storage.job_dir(job_id))
        except Exception as e:  # anything about this job fails this job, never the replica
            if self.trainer is None:
                return {**dataclasses.asdict(JobStatus(job_id, job_id, JobState.FAILED, error=f"{type(e).__name__}: {e}")),
                        "tokens_per_s": 0.0}
            st = self.trainer.status.setdefault(job_id, JobStatus(job_id, job_id, JobState.RUNNING))
            st.state, st.error = JobState.FAILED, f"{type(e).__name__}: {e}"
        return _status_dict(st)

    def remove_job(self, job_id: str, state: JobState = JobState.PREEMPTED) -> dict | None:
        if self.trainer is None or job_id not in self.trainer.status:
            return None
        return _status_dict(self.trainer.remove_job(job_id, state))

    def report(self, n: int = 1) -> dict:
        """Up to n fused steps, then every job's status; jobs that ended (done, failed, oom) are reported
        once and forgotten. A lost report is harmless: re-added, a done job finds its final checkpoint."""
        out = self.step(n)
        if self.trainer is not None:
            for st in list(self.trainer.status.values()):
                if JobState(st.state).leaves_replica:
                    self.trainer.remove_job(st.name, st.state, checkpoint=False)
        return out

    def holds(self) -> dict:
        """What this replica holds (for a restarted controller adopting it)."""
        import torch

        t = self.trainer
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        return {"base_model": None if t is None else t.base_model.model_dump_json(),
                "jobs": self.status(), "node": self.node, "gpu": gpu,
                "device_memory": torch.cuda.get_device_properties(0).total_memory if gpu else None}

    # ---- both -----------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        return [] if self.trainer is None else [_status_dict(st) for st in self.trainer.status.values()]

    def step(self, n: int = 1) -> dict:
        """Up to n fused steps; the jobs' status, each step's (job, step, loss, tokens/s, padding, eval loss),
        throughput."""
        tokens, pad, seconds, rows = 0, 0, 0.0, []
        waited = 0.0 if self.stage is None else self.stage.links.wait_seconds
        for stats in ([] if self.trainer is None else self.trainer.steps(n)):
            tokens, pad, seconds = tokens + stats.tokens, pad + stats.pad_tokens, seconds + stats.seconds
            rows += [(name, r.step, r.loss, r.tokens / stats.seconds if stats.seconds else 0.0, r.padding, r.eval_loss)
                     for name, r in stats.records.items()]
        return {
            "jobs": self.status(),
            "rows": rows,
            "running": 0 if self.trainer is None else len(self.trainer.running),
            "tokens": tokens,
            "seconds": seconds,
            "padding": pad / max(1, tokens + pad),
            "device": None if self.trainer is None else str(self.trainer.engine.device),
            "pid": os.getpid(),
            "node": self.node,
            # a stage's time waiting for its neighbours in these steps (its share of the bubble)
            "wait_seconds": 0.0 if self.stage is None else self.stage.links.wait_seconds - waited,
        }

    def evaluate(self) -> dict:
        return self.trainer.evaluate()


def _status_dict(st) -> dict:
    d = dataclasses.asdict(st)
    d["tokens_per_s"] = st.tokens_per_s
    return d


def start_replica(cfg: RunConfig, output_dir: str | Path, name: str = "rayft-train-replica"):
    """`rayft train`'s replica: one GPU where the config asks for CUDA, else every CPU of the node."""
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
