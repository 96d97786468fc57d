"""Which replica runs which job, by memory. Pure Python.

A job goes where the memory model says the replica's peak stays under its budget with the job
added; among those, to the one left with the most free memory. Sequence lengths need not be
grouped: the fused step is one padding-free token stream, so a 128-token job beside a 4096-token
one costs what it costs alone. The queue is served by priority, then arrival, so within a priority
nobody is overtaken forever.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, Coefficients, JobShape, ModelShape, estimate
from rayft.scheduler.stages import stage_estimates


@dataclass(frozen=True)
class Request:
    name: str
    shape: JobShape
    priority: int = 0
    arrival: float = 0.0


@dataclass
class ReplicaState:
    name: str
    model: ModelShape
    budget: int  # bytes the estimate must stay under (e.g. 90% of device memory; per stage when staged)
    jobs: dict[str, JobShape] = field(default_factory=dict)
    stages: int = 1  # pipeline stages, one device each: the peak is then the most loaded stage's

    def peak(self, coef: Coefficients = DEFAULT_COEFFICIENTS, extra: Request | None = None) -> int:
        jobs = dict(self.jobs)
        if extra is not None:
            jobs[extra.name] = extra.shape
        if self.stages == 1:
            return estimate(self.model, jobs, coef).total
        return max(e.total for e in stage_estimates(self.model, jobs, self.stages, coef))


def place(queue: list[Request], replicas: list[ReplicaState], coef: Coefficients = DEFAULT_COEFFICIENTS,
          now: float | None = None, aging_s: float | None = None,
          starve_after_s: float | None = None) -> tuple[dict[str, str], list[Request]]:
    """Assign queued jobs to replicas (mutating their job sets). Returns ({job: replica}, still queued).

    Fairness, given `now`: a job's priority grows by one per `aging_s` seconds of waiting, so a
    steady stream of higher-priority jobs cannot hold it back forever; and a job that has waited
    `starve_after_s` and still does not fit stops later jobs from being placed (no backfilling
    around it), so memory frees up for it as running jobs finish."""
    placed: dict[str, str] = {}
    waiting: list[Request] = []

    def rank(r: Request):
        aged = r.priority + ((now - r.arrival) / aging_s if now is not None and aging_s else 0.0)
        return (-aged, r.arrival, r.name)

    blocked = False
    for req in sorted(queue, key=rank):
        fits = [] if blocked else [(r, peak) for r in replicas if (peak := r.peak(coef, req)) <= r.budget]
        if not fits:
            waiting.append(req)
            if now is not None and starve_after_s is not None and now - req.arrival >= starve_after_s:
                blocked = True
            continue
        best, _ = min(fits, key=lambda rp: rp[1] - rp[0].budget)
        best.jobs[req.name] = req.shape
        placed[req.name] = best.name
    return placed, waiting


def preemption(req: Request, replicas: list[ReplicaState], running: dict[str, Request],
               coef: Coefficients = DEFAULT_COEFFICIENTS) -> tuple[str, list[str]] | None:
    """The fewest lower-priority running jobs to checkpoint and requeue so that `req` fits, and
    where: (replica, victims), or None when no such set exists. Victims go lowest priority first,
    then the most recently arrived (it has the least progress to redo if its checkpoint is old)."""
    best: tuple[str, list[str]] | None = None
    for r in replicas:
        trial = ReplicaState(r.name, r.model, r.budget, dict(r.jobs), r.stages)
        victims = sorted((n for n in r.jobs if running[n].priority < req.priority),
                         key=lambda n: (running[n].priority, -running[n].arrival))
        chosen: list[str] = []
        while trial.peak(coef, req) > trial.budget and victims:
            v = victims.pop(0)
            del trial.jobs[v]
            chosen.append(v)
        if trial.peak(coef, req) <= trial.budget and (best is None or len(chosen) < len(best[1])):
            best = (r.name, chosen)
    return best


def fits_alone(req: Request, model: ModelShape, budget: int, coef: Coefficients = DEFAULT_COEFFICIENTS,
               stages: int = 1) -> bool:
    """Whether the job fits an empty replica of this budget (of `stages` stages)."""
    return ReplicaState("probe", model, budget, stages=stages).peak(coef, req) <= budget


def never_fits(req: Request, model: ModelShape, budgets: Iterable[int | None],
               coef: Coefficients = DEFAULT_COEFFICIENTS, stages: int = 1) -> bool:
    """Whether no replica could ever hold the job, so it should fail rather than wait.

    `budgets` are the full budgets of all the cluster's replicas, whatever they run now: a replica
    busy with other jobs, or with another base model, is emptied by time, so only the job's own
    estimate against each replica's whole budget decides. A budget not known yet (None: a GPU
    replica still starting) might hold it, and so might a cluster with no replicas yet (it grows)."""
    budgets = list(budgets)
    if not budgets or any(b is None for b in budgets):
        return False
    return not any(fits_alone(req, model, b, coef, stages) for b in budgets)
