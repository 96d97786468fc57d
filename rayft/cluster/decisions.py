"""The controller's decisions, as data. Pure Python: no Ray, no registry writes.

Given the cluster's nodes, the registry's jobs and what the controller knows of its replicas
(their views) and what they report, these functions return actions: start a replica on free
devices, drop one whose node left, merge idle replicas into a staged one or stop an idle staged
one; place a job, preempt one, fail one, requeue one (smaller, after running out of memory),
record its progress or its end. The controller
(`rayft.cluster.controller`) is the thin shell that gathers the views, calls these and applies the
actions to the registry and the replica actors; tests drive these directly, in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from rayft.config import RunConfig
from rayft.scheduler.memory import GIB, Coefficients
from rayft.scheduler.packing import ReplicaState, Request, never_fits, place, preemption
from rayft.scheduler.plan import cannot_shrink, halve_micro_batch, job_shapes
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
    nodes: tuple[str, ...] = ("",)  # the node of each of its stages (one entry per stage)

    @property
    def stages(self) -> int:  # pipeline stages (devices) it spans
        return len(self.nodes)

    @property
    def node(self) -> str:  # where it starts (its first stage)
        return self.nodes[0]


@dataclass(frozen=True)
class NodeView:
    """An alive node: its stage slots (a GPU each; on a CPU node `cpu_replicas_per_node` times the
    stages of a replica, each stage taking its share of a replica's CPUs)."""

    id: str
    slots: int
    gpu: bool = False
    refused: bool = False  # a replica failed to start there: none is started again


@dataclass
class Policy:
    """The settings the decisions read (from `ClusterConfig`)."""

    memory_budget: float = 0.9
    aging_s: float = 600.0
    starve_after_s: float = 1800.0
    auto: bool = False  # a job too big for one device gets a staged replica of the fewest stages that fit
    stages: int = 1  # without `auto`: the stages of every replica


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
class Regroup:  # retire these idle one-stage replicas and start one staged replica on their devices
    nodes: tuple[str, ...]  # the node of each stage
    replicas: tuple[str, ...]
    event: str

    @property
    def stages(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class StartReplica:  # on free stage slots: one per stage, in stage order
    nodes: tuple[str, ...]
    gpu: bool
    event: str


@dataclass(frozen=True)
class LoseReplica:  # its node (or one of its stages' nodes) left: its jobs go back to the queue
    replica: str
    why: str


@dataclass(frozen=True)
class StopReplica:  # an idle staged replica no waiting job needs: its devices go back to one-stage replicas
    replica: str
    event: str


Action = Place | Preempt | Fail | Requeue | Progress | Finish | Regroup | StartReplica | LoseReplica | StopReplica


def request(rec: JobRecord) -> Request:
    """A registry job as the scheduler sees it."""
    return Request(rec.id, job_shapes(rec.config)[rec.config.jobs[0].name], rec.priority, rec.submitted_at)


def replica_memory(replica: ReplicaView, shape_of: Callable[[RunConfig], object], coef: Coefficients) -> dict:
    """What the memory model says a replica's jobs need, per stage (bytes), beside its budget; no
    stages for an idle replica or one whose base cannot be sized."""
    stages: list[int] = []
    if replica.jobs:
        first = next(iter(replica.jobs.values()))
        try:
            model = shape_of(first.config)
        except (OSError, ValueError):
            model = None
        if model is not None:
            jobs = {j: request(rec).shape for j, rec in replica.jobs.items()}
            stages = [int(e.total) for e in stage_estimates(model, jobs, replica.stages, coef)]
    return {"stages": stages, "budget": replica.budget}


# ---- scheduling ----------------------------------------------------------------------------------

def lifecycle(nodes: list[NodeView], replicas: list[ReplicaView], policy: Policy) -> list[Action]:
    """Replicas lost with a node that left, and replicas to start on the stage slots no replica
    takes: with `auto` a one-stage replica per slot; else replicas of `policy.stages` stages, on one
    node where it has slots enough, else over the fewest nodes of one kind (GPU or CPU) whose
    leftover slots add up to a replica."""
    alive = {n.id for n in nodes}
    actions: list[Action] = [LoseReplica(r.name, "its node left the cluster") for r in replicas
                             if not set(r.nodes) <= alive]
    kept = [r for r in replicas if set(r.nodes) <= alive]
    used = Counter(n for r in kept for n in r.nodes)
    free = {n.id: max(n.slots - used[n.id], 0) for n in nodes if not n.refused}
    per = 1 if policy.auto else policy.stages
    for n in nodes:
        while free.get(n.id, 0) >= per:
            actions.append(StartReplica((n.id,) * per, n.gpu, f"starting a replica on node {n.id[:8]}"))
            free[n.id] -= per
    for gpu in (True, False):  # what is left, across nodes: the most free slots first (fewest nodes)
        pool = [n.id for n in sorted((n for n in nodes if n.gpu == gpu), key=lambda n: -free.get(n.id, 0))
                for _ in range(free.get(n.id, 0))]
        while len(pool) >= per:
            group, pool = tuple(pool[:per]), pool[per:]
            actions.append(StartReplica(group, gpu, f"starting a replica of {per} stages over nodes "
                                                    f"{', '.join(sorted({g[:8] for g in group}))}"))
    return actions


def schedule(queued: list[JobRecord], replicas: list[ReplicaView], shape_of: Callable[[RunConfig], object],
             coef: Coefficients, policy: Policy, now: float, nodes: list[NodeView] = ()) -> list[Action]:
    """Where the queued jobs go, which fail as never fitting, and at most one preemption per base
    model for the first job that waits. `shape_of(config)` gives a job's base ModelShape (or raises
    OSError / ValueError when its config cannot be read: those jobs fail). With `auto`, a job no
    one-stage replica could hold gets a staged replica made of idle ones (`Regroup`, from the
    `nodes`), and a staged replica left idle that no waiting job fits is stopped."""
    # copies: what earlier decisions of this call placed counts for the later ones (an empty
    # replica given a job of one base model is no longer free for another's)
    replicas = [replace(r, jobs=dict(r.jobs)) for r in replicas]
    usable = [r for r in replicas if r.ready]
    if not usable:
        return []
    actions: list[Action] = []
    regrouping: set[str] = set()  # replicas a Regroup of this call retires
    waiting_big: list[tuple[Request, object]] = []  # (request, model) of jobs no one-stage replica holds
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
            if policy.auto and all(never_fits(req, model, [r.budget], coef, 1) for r in replicas):
                waiting_big.append((req, model))
            if all(never_fits(req, model, [r.budget], coef, r.stages) for r in replicas):
                needed = _stages_needed(req, model, replicas, coef, nodes) if policy.auto else None
                if needed is None:
                    actions.append(_never_fits(rec, req, model, replicas, coef, policy))
                elif needed[1] and not regrouping & set(needed[1]):
                    stage_nodes, retire = needed
                    regrouping |= set(retire)
                    actions.append(Regroup(stage_nodes, retire, f"{rec.id} needs {len(stage_nodes)} pipeline "
                                                                f"stages: replicas {', '.join(retire)} become one"))
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
    if policy.auto:
        for r in usable:
            if r.stages > 1 and not r.jobs and not any(
                    not never_fits(req, model, [r.budget], coef, r.stages) for req, model in waiting_big):
                actions.append(StopReplica(r.name, f"replica {r.name} ({r.stages} stages) idle and no waiting "
                                                   "job needs it: back to one-stage replicas"))
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
                   nodes: list[NodeView]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """With `auto`: (each stage's node, the idle one-stage replicas to retire) for the fewest stages
    the devices of one node, or else of all nodes of one kind together, could give the job; ((), ())
    when there are not enough idle replicas yet (the job waits); None when no node or set of nodes
    has devices enough. Stages on one node are preferred, then the fewest stages."""
    from rayft.scheduler.stages import fewest_stages

    by_kind: dict[bool, list[NodeView]] = {}
    for n in nodes:
        by_kind.setdefault(n.gpu, []).append(n)
    candidates = [[n] for n in nodes] + [group for group in by_kind.values() if len(group) > 1]
    best, best_key = None, None
    for group in candidates:
        ids = {n.id for n in group}
        mine = [r for r in replicas if set(r.nodes) <= ids]
        budget = min((r.budget for r in mine if r.budget is not None), default=None)
        slots = sum(n.slots for n in group)
        if budget is None or slots < 2:
            continue
        stages = fewest_stages(model, {req.name: req.shape}, budget, coef, most=slots)
        if stages is None or stages == 1:
            continue
        idle = [r for r in mine if r.ready and not r.jobs and r.stages == 1]
        per_node = Counter(r.node for r in idle)  # stages where most idle replicas are: the fewest nodes
        idle.sort(key=lambda r: (-per_node[r.node], r.node, r.name))
        take = idle[:stages] if len(idle) >= stages else []
        key = (bool(take), len(group) == 1, -stages)
        if best_key is None or key > best_key:
            best_key = key
            best = (tuple(r.node for r in take), tuple(r.name for r in take))
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
        return Fail(rec.id, f"{error}; {cannot_shrink(rec.config)}", f"{rec.id} failed: {error}")
    job = smaller.jobs[0]
    return Requeue(rec.id, f"{rec.id} out of memory on {rec.replica}: requeued with tokens_per_micro_batch="
                           f"{job.tokens_per_micro_batch}, grad_accumulation={job.optimizer.grad_accumulation}",
                   smaller)
