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
    node: str = ""
    stages: int = 1  # pipeline stages (devices) it spans


@dataclass
class Policy:
    """The settings the decisions read (from `ClusterConfig`)."""

    memory_budget: float = 0.9
    aging_s: float = 600.0
    starve_after_s: float = 1800.0
    auto: bool = False  # a job too big for one device gets a staged replica of the fewest stages that fit
    slots_per_node: dict[str, int] = field(default_factory=dict)  # devices (replica slots) of each node


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


@dataclass(frozen=True)
class Regroup:  # retire these idle one-stage replicas of a node and start one of `stages` stages there
    node: str
    replicas: tuple[str, ...]
    stages: int
    event: str


Action = Place | Preempt | Fail | Requeue | Progress | Finish | Regroup


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
    replicas = [ReplicaView(r.name, r.ready, r.base, dict(r.jobs), r.budget, r.fresh, r.node, r.stages)
                for r in replicas]
    usable = [r for r in replicas if r.ready]
    if not queued or not usable:
        return []
    actions: list[Action] = []
    regrouping: set[str] = set()  # replicas a Regroup of this call retires
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
            # every replica's whole budget, busy or not, whatever base it holds: what could ever run it
            if all(never_fits(req, model, [r.budget], coef, r.stages) for r in replicas):
                needed = _stages_needed(req, model, replicas, coef, policy) if policy.auto else None
                if needed is None:
                    actions.append(_never_fits(rec, req, model, replicas, coef, policy))
                elif needed[1] and not regrouping & set(needed[1]):
                    node, retire, stages = needed[0], needed[1], needed[2]
                    regrouping |= set(retire)
                    actions.append(Regroup(node, retire, stages, f"{rec.id} needs {stages} pipeline stages: "
                                                                 f"replicas {', '.join(retire)} become one"))
                continue  # it waits for the staged replica (or for idle replicas to make one of)
            requests[rec.id] = (req, rec)
        group = [r for r in usable if (r.base == base or not r.jobs) and r.name not in regrouping]
        if not requests or not group:
            continue  # they wait: some replica could hold each of them once it is free
        states = {r.name: ReplicaState(r.name, model, r.budget, {j: request(jr).shape for j, jr in r.jobs.items()},
                                       r.stages) for r in group}
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


def _never_fits(rec: JobRecord, req: Request, model, replicas: list[ReplicaView], coef: Coefficients,
                policy: Policy) -> Fail:
    stages = max(r.stages for r in replicas)
    peak = max(e.total for e in stage_estimates(model, {req.name: req.shape}, stages, coef))
    budgets = [r.budget for r in replicas]
    more = (" (and no node has devices enough for a staged replica it would fit)" if policy.auto else "")
    return Fail(rec.id, (
        f"does not fit a replica: estimated peak {peak / GIB:.2f} GiB alone"
        f"{' on its busiest stage' if stages > 1 else ''}, over the {policy.memory_budget:.0%} "
        f"memory budget of every replica (the largest: {max(budgets) / GIB:.2f} GiB){more}; lower "
        "tokens_per_micro_batch, max_seq_len or r"), f"{rec.id} failed: does not fit a replica")


def _stages_needed(req: Request, model, replicas: list[ReplicaView], coef: Coefficients,
                   policy: Policy) -> tuple[str, tuple[str, ...], int] | None:
    """With `auto`: (node, its idle one-stage replicas to retire, stages) for the fewest stages a
    node's devices could give the job; (node, (), stages) when that node has not enough idle
    replicas yet (the job waits); None when no node has devices enough."""
    from rayft.scheduler.stages import fewest_stages

    best = None
    for node, slots in policy.slots_per_node.items():
        mine = [r for r in replicas if r.node == node]
        budget = min((r.budget for r in mine if r.budget is not None), default=None)
        if budget is None or slots < 2:
            continue
        stages = fewest_stages(model, {req.name: req.shape}, budget, coef, most=slots)
        if stages is None or stages == 1:
            continue
        idle = tuple(sorted(r.name for r in mine if r.ready and not r.jobs and r.stages == 1))
        option = (node, idle[:stages] if len(idle) >= stages else (), stages)
        if best is None or (bool(option[1]), -stages) > (bool(best[1]), -best[2]):
            best = option
    return best


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
