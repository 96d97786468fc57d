"""A run config as the scheduler sees it: job shapes, estimates, a placement. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from rayft.config import RunConfig
from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, Coefficients, Estimate, JobShape, ModelShape, estimate
from rayft.scheduler.packing import ReplicaState, Request, never_fits, place


def job_shapes(cfg: RunConfig) -> dict[str, JobShape]:
    shapes = {}
    for job in cfg.jobs:
        ad = cfg.adapter(job.adapter)
        shapes[job.name] = JobShape(
            rank=ad.r,
            tokens_per_step=job.tokens_per_micro_batch,
            max_seq_len=job.max_seq_len,
            variant=ad.variant,
            targets=ad.target_modules if isinstance(ad.target_modules, str) else tuple(ad.target_modules),
            optimizer_states=2 if job.optimizer.name == "adamw" else (1 if job.optimizer.momentum else 0),
            micro_batches=job.optimizer.grad_accumulation,
        )
    return shapes


@dataclass
class Plan:
    model: ModelShape
    per_job: dict[str, Estimate]  # each job alone on a replica
    replicas: list[ReplicaState]
    estimates: dict[str, Estimate]  # per replica, with its placed jobs
    waiting: list[str]  # jobs that fit no replica now
    never_fit: list[str]  # jobs that do not fit even an empty replica
    unmatched: list[str]  # jobs whose adapter's target_modules select no layer of this model


def make_plan(cfg: RunConfig, model: ModelShape, replicas: int, budget_bytes: int,
              coef: Coefficients = DEFAULT_COEFFICIENTS) -> Plan:
    shapes = job_shapes(cfg)
    per_job = {n: estimate(model, {n: s}, coef) for n, s in shapes.items()}
    requests = [Request(j.name, shapes[j.name], arrival=i) for i, j in enumerate(cfg.jobs)]
    never = [q.name for q in requests if never_fits(q, model, [budget_bytes] * replicas, coef)]
    unmatched = [n for n, s in shapes.items() if s.adapter_params(model) == 0]
    states = [ReplicaState(f"replica-{i}", model, budget_bytes) for i in range(replicas)]
    _, waiting = place([q for q in requests if q.name not in never], states, coef)
    return Plan(model, per_job, states, {r.name: estimate(model, r.jobs, coef) for r in states},
                [r.name for r in waiting], never, unmatched)


def halve_micro_batch(cfg: RunConfig) -> RunConfig | None:
    """A one-job config whose micro-batches are 1/d as many rows (d the smallest divisor > 1 of the
    row count, 2 for an even one) with d times the accumulation: the same rows per optimizer step,
    so the same training, in about 1/d the activation memory. None when a micro-batch is one row."""
    job = cfg.jobs[0]
    rows = job.tokens_per_micro_batch // job.max_seq_len
    if rows < 2:
        return None
    d = next(k for k in range(2, rows + 1) if rows % k == 0)
    opt = job.optimizer.model_copy(update={"grad_accumulation": job.optimizer.grad_accumulation * d})
    smaller = job.model_copy(update={"tokens_per_micro_batch": rows // d * job.max_seq_len, "optimizer": opt})
    return cfg.model_copy(update={"jobs": [smaller]})


def cannot_shrink(cfg: RunConfig) -> str:
    """Why an out-of-memory job of one row per micro-batch is not retried smaller."""
    return (f"already one row of max_seq_len={cfg.jobs[0].max_seq_len} per micro-batch, cannot shrink further: "
            "lower max_seq_len or r")


def retried_smaller(why: str, smaller: RunConfig) -> str:
    """The warning of a job put back with smaller micro-batches (`halve_micro_batch`)."""
    job = smaller.jobs[0]
    return (f"{why}: retried with tokens_per_micro_batch={job.tokens_per_micro_batch}, "
            f"grad_accumulation={job.optimizer.grad_accumulation}")
