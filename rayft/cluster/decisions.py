"""The controller's decisions, as data. Pure Python: no Ray, no registry writes.

Given the registry's jobs and what the controller knows of its replicas (their views) and what
they report, these functions return actions: place a job, preempt one, fail one, requeue one
(smaller, after running out of memory), record its progress or its end. The controller
(`rayft.cluster.controller`) is the thin shell that gathers the views, calls these and applies the
actions to the registry and the replica actors; tests drive these directly, in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rayft.config import RunConfig
from rayft.scheduler.memory import GIB, Coefficients
from rayft.scheduler.packing import ReplicaState, Request, never_fits, place, preemption
from rayft.scheduler.plan import halve_micro_batch, job_shapes
from rayft.scheduler.stages import stage_estimates
from rayft.states import JobState
from rayft.store.registry import JobRecord


@dataclass
class ReplicaView:
    """What the controller knows of one replica."""

    name: str
    ready: bool  # answered its first call
    base: str | None  # the base model config (JSON) it holds; None while empty
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    budget: int | None = None  # bytes its (per-stage) estimate may use; None: not known yet
    fresh: frozenset[str] = frozenset()  # jobs placed after its running report was asked for


@dataclass(frozen=True)
class Policy:
    """The settings the decisions read (from `ClusterConfig`)."""

    stages: int = 1
    memory_budget: float = 0.9
    aging_s: float = 600.0
    starve_after_s: float = 1800.0


# ---- actions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    job: str
    replica: str
    base: str


@dataclass(frozen=True)
class Preempt:  # checkpoint it on its replica, then requeue it
    job: str
    replica: str
    event: str


@dataclass(frozen=True)
class Fail:
    job: str
    error: str
    event: str


@dataclass(frozen=True)
class Requeue:
    job: str
    event: str
    config: RunConfig | None = None  # a smaller one (out of memory), else the job's own


@dataclass(frozen=True)
class Progress:
    job: str
    step: int
    total_steps: int
    status: dict  # the replica's status of the job (loss, tokens/s)


@dataclass(frozen=True)
class Finish:
    job: str
    step: int
    total_steps: int
    status: dict


Action = Place | Preempt | Fail | Requeue | Progress | Finish


def request(rec: JobRecord) -> Request:
    """A registry job as the scheduler sees it."""
    return Request(rec.id, job_shapes(rec.config)[rec.config.jobs[0].name], rec.priority, rec.submitted_at)


# ---- scheduling ----------------------------------------------------------------------------------

def schedule(queued: list[JobRecord], replicas: list[ReplicaView], shape_of: Callable[[RunConfig], object],
             coef: Coefficients, policy: Policy, now: float) -> list[Action]:
    """Where the queued jobs go, which fail as never fitting, and at most one preemption per base
    model for the first job that waits. `shape_of(config)` gives a job's base ModelShape (or raises
    OSError / ValueError when its config cannot be read: those jobs fail)."""
    # copies: what earlier decisions of this call placed counts for the later ones (an empty
    # replica given a job of one base model is no longer free for another's)
    replicas = [ReplicaView(r.name, r.ready, r.base, dict(r.jobs), r.budget, r.fresh) for r in replicas]
    usable = [r for r in replicas if r.ready]
    if not queued or not usable:
        return []
    actions: list[Action] = []
    # every replica's whole budget, busy or not, whatever base it holds: what could ever run a job
    budgets = [r.budget for r in replicas]
    by_base: dict[str, list[JobRecord]] = {}
    for rec in queued:
        by_base.setdefault(rec.config.base_model.model_dump_json(), []).append(rec)
    for base, recs in by_base.items():
        try:
            model = shape_of(recs[0].config)
        except (OSError, ValueError) as e:
            actions += [Fail(rec.id, f"cannot size the job: {e}", f"{rec.id} failed: base model config unreadable")
                        for rec in recs]
            continue
        requests = {}
        for rec in recs:
            req = request(rec)
            if never_fits(req, model, budgets, coef, policy.stages):
                peak = max(e.total for e in stage_estimates(model, {req.name: req.shape}, policy.stages, coef))
                actions.append(Fail(rec.id, (
                    f"does not fit a replica: estimated peak {peak / GIB:.2f} GiB alone"
                    f"{' on its busiest stage' if policy.stages > 1 else ''}, over the {policy.memory_budget:.0%} "
                    f"memory budget of every replica (the largest: {max(budgets) / GIB:.2f} GiB); lower "
                    "tokens_per_micro_batch, max_seq_len or r"), f"{rec.id} failed: does not fit a replica"))
                continue
            requests[rec.id] = (req, rec)
        group = [r for r in usable if r.base == base or not r.jobs]
        if not requests or not group:
            continue  # they wait: some replica could hold each of them once it is free
        states = {r.name: ReplicaState(r.name, model, r.budget, {j: request(jr).shape for j, jr in r.jobs.items()},
                                       policy.stages) for r in group}
        placed, waiting = place([q for q, _ in requests.values()], list(states.values()), coef,
                                now=now, aging_s=policy.aging_s, starve_after_s=policy.starve_after_s)
        decided = [Place(job, replica, base) for job, replica in placed.items()]
        if waiting:
            running = {j: request(jr) for r in group for j, jr in r.jobs.items()}
            running.update({job: requests[job][0] for job in placed})  # the states hold them now too
            decided += _preempt_for(waiting[0], requests[waiting[0].name][1], states, running, base, coef)
        views = {r.name: r for r in replicas}
        for a in decided:
            view = views[a.replica]
            if isinstance(a, Preempt):
                del view.jobs[a.job]
            else:
                view.jobs[a.job], view.base = requests[a.job][1], base
        actions += decided
    return actions


def _preempt_for(req: Request, rec: JobRecord, states: dict, running: dict[str, Request], base: str,
                 coef: Coefficients) -> list[Action]:
    found = preemption(req, list(states.values()), running, coef)
    if found is None or not found[1]:
        return []
    replica, victims = found
    return [Preempt(v, replica, f"preempted {v} (priority {running[v].priority}) for {rec.id} "
                                f"(priority {rec.priority})") for v in victims] + [Place(rec.id, replica, base)]


# ---- reports -------------------------------------------------------------------------------------

def read_report(replica: ReplicaView, report: dict) -> list[Action]:
    """What a replica's report means for each job it holds: progress, done, failed, requeued smaller
    after running out of memory, or requeued because the replica no longer holds it."""
    actions: list[Action] = []
    for st in report["jobs"]:
        rec = replica.jobs.get(st["name"])
        if rec is None:
            continue  # cancelled or preempted since the call started
        state = JobState(st["state"])
        if state == JobState.DONE:
            actions.append(Finish(rec.id, st["step"], st["total_steps"], st))
        elif state == JobState.OOM:
            actions.append(out_of_memory(rec, st["error"]))
        elif state == JobState.FAILED:
            actions.append(Fail(rec.id, st["error"], f"{rec.id} failed: {st['error']}"))
        else:
            actions.append(Progress(rec.id, st["step"], st["total_steps"], st))
    reported = {st["name"] for st in report["jobs"]}
    for job in replica.jobs:
        if job not in reported and job not in replica.fresh:  # e.g. removed by a call a previous controller sent
            actions.append(Requeue(job, f"requeued {job}: {replica.name} no longer holds it"))
    return actions


def out_of_memory(rec: JobRecord, error: str) -> Action:
    """An out-of-memory job goes back to the queue with half the rows per micro-batch (and twice
    the accumulation: the same training), or fails when it is down to one row."""
    smaller = halve_micro_batch(rec.config)
    if smaller is None:
        return Fail(rec.id, f"{error}; already one row of max_seq_len={rec.config.jobs[0].max_seq_len} per "
                            "micro-batch: lower max_seq_len or r", f"{rec.id} failed: {error}")
    job = smaller.jobs[0]
    return Requeue(rec.id, f"{rec.id} out of memory on {rec.replica}: requeued with tokens_per_micro_batch="
                           f"{job.tokens_per_micro_batch}, grad_accumulation={job.optimizer.grad_accumulation}",
                   smaller)
