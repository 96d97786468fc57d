"""The controller's decisions without Ray: generated clusters and reports, checked for what the
shell relies on (placements within budgets, failures only for jobs nothing could ever hold,
preemption only of lower priorities, every reported job accounted for exactly once)."""

import dataclasses
import random

import pytest

from rayft.cluster import decisions
from rayft.config import parse_config
from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, GIB, TINYLLAMA_CONFIG, ModelShape
from rayft.scheduler.packing import ReplicaState
from rayft.states import JobState
from rayft.store.registry import JobRecord

MODEL = ModelShape.from_hf_config(TINYLLAMA_CONFIG)
BASES = ("/models/a", "/models/b")


def job_config(rng: random.Random, base: str):
    seq = rng.choice([256, 512, 1024])
    return parse_config({
        "base_model": {"path": base},
        "adapters": [{"name": "x", "r": rng.choice([8, 16, 64])}],
        "datasets": [{"name": "d", "path": "d.jsonl"}],
        "jobs": [{"adapter": "x", "dataset": "d", "steps": 10, "max_seq_len": seq,
                  "tokens_per_micro_batch": seq * rng.choice([1, 2, 4, 8])}],
    })


def record(rng: random.Random, i: int, state=JobState.QUEUED, base=None, replica=None) -> JobRecord:
    cfg = job_config(rng, base or rng.choice(BASES))
    return JobRecord(f"j{i}", "x", "x", cfg, state, rng.randint(0, 3), 0, 10, replica, None, float(i), float(i))


def draw_cluster(rng: random.Random, stages: int):
    replicas, running, n = [], [], 0
    for k in range(rng.randint(1, 4)):
        budget = int(rng.choice([3, 6, 12]) * GIB)
        view = decisions.ReplicaView(f"r{k}", rng.random() < 0.9, None, {}, budget, nodes=("n",) * stages)
        if rng.random() < 0.6:
            view.base = rng.choice(BASES)
            for _ in range(rng.randint(1, 2)):
                rec = record(rng, n, JobState.RUNNING, view.base, view.name)
                n += 1
                view.jobs[rec.id] = rec
                running.append(rec)
        replicas.append(view)
    queued = [record(rng, n + i) for i in range(rng.randint(1, 6))]
    return replicas, queued


def base_of(rec: JobRecord) -> str:
    return rec.config.base_model.model_dump_json()


@pytest.mark.parametrize("seed", range(60))
def test_schedule_places_within_budgets_fails_only_the_hopeless_and_preempts_only_lower_priorities(seed):
    rng = random.Random(seed)
    stages = rng.choice([1, 1, 2])
    replicas, queued = draw_cluster(rng, stages)
    policy = decisions.Policy()  # each view carries its replica's stage count
    actions = decisions.schedule(queued, replicas, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, now=100.0)
    by_id = {r.id: r for r in queued}
    views = {r.name: r for r in replicas}
    running = {j: rec for r in replicas for j, rec in r.jobs.items()}
    placed = [a for a in actions if isinstance(a, decisions.Place)]
    assert len({a.job for a in placed}) == len(placed), "no job placed twice"
    failed = {a.job for a in actions if isinstance(a, decisions.Fail)}
    preempted = [a for a in actions if isinstance(a, decisions.Preempt)]
    assert not failed & {a.job for a in placed}
    priority = {j: r.priority for j, r in {**running, **by_id}.items()}
    for a in preempted:  # only lower-priority jobs, for a job placed there after them
        later = [p for p in actions[actions.index(a):] if isinstance(p, decisions.Place) and p.replica == a.replica]
        assert later and priority[a.job] < by_id[later[0].job].priority
    # every replica's jobs after the actions, applied in order: within its budget, all of one base model
    after = {name: dict(v.jobs) for name, v in views.items()}
    for a in actions:
        if isinstance(a, decisions.Preempt):
            del after[a.replica][a.job]
        elif isinstance(a, decisions.Place):
            assert views[a.replica].ready
            after[a.replica][a.job] = by_id[a.job]
    for name, jobs in after.items():
        if not jobs:
            continue
        assert len({base_of(r) for r in jobs.values()}) == 1, "one base model per replica"
        state = ReplicaState(name, MODEL, views[name].budget,
                             {j: decisions.request(r).shape for j, r in jobs.items()}, stages)
        new = {a.job for a in placed if a.replica == name}
        if new:
            assert state.peak(DEFAULT_COEFFICIENTS) <= views[name].budget
    for job in failed:  # nothing in the cluster could ever hold it alone
        req = decisions.request(by_id[job])
        for v in replicas:
            assert ReplicaState(v.name, MODEL, v.budget, {}, stages).peak(DEFAULT_COEFFICIENTS, req) > v.budget


def test_an_unreadable_base_model_fails_its_jobs_by_name():
    rng = random.Random(0)
    queued = [record(rng, 0)]

    def unreadable(cfg):
        raise OSError("no config.json")

    view = decisions.ReplicaView("r0", True, None, {}, 8 * GIB)
    (action,) = decisions.schedule(queued, [view], unreadable, DEFAULT_COEFFICIENTS, decisions.Policy(), 0.0)
    assert isinstance(action, decisions.Fail) and "cannot size the job: no config.json" in action.error


@pytest.mark.parametrize("seed", range(30))
def test_every_held_job_gets_one_decision_from_a_report(seed):
    rng = random.Random(seed)
    view = decisions.ReplicaView("r0", True, "b", {})
    statuses = []
    for i in range(rng.randint(1, 6)):
        rec = record(rng, i, JobState.RUNNING, BASES[0], "r0")
        view.jobs[rec.id] = rec
        fate = rng.choice(["running", "done", "failed", "oom", "missing", "fresh"])
        if fate == "fresh":
            view.fresh = view.fresh | {rec.id}
        elif fate != "missing":
            statuses.append({"name": rec.id, "state": fate, "step": 3, "total_steps": 10,
                             "error": "boom" if fate in ("failed", "oom") else None})
    statuses.append({"name": "elsewhere", "state": "running", "step": 1, "total_steps": 2, "error": None})
    actions = decisions.read_report(view, {"jobs": statuses})
    fates = {s["name"]: s["state"] for s in statuses}
    jobs = [a.job for a in actions]
    assert len(jobs) == len(set(jobs)) and "elsewhere" not in jobs
    for job, rec in view.jobs.items():
        got = [a for a in actions if a.job == job]
        fate = fates.get(job, "fresh" if job in view.fresh else "missing")
        if fate == "fresh":
            assert got == []  # placed after the report was asked for: not in it yet
            continue
        (a,) = got
        if fate == "running":
            assert isinstance(a, decisions.Progress) and a.step == 3
        elif fate == "done":
            assert isinstance(a, decisions.Finish)
        elif fate == "failed":
            assert isinstance(a, decisions.Fail) and a.error == "boom"
        elif fate == "missing":
            assert isinstance(a, decisions.Requeue) and a.config is None
        else:  # out of memory: half the rows per micro-batch, twice the accumulation; fails at one row
            job_cfg = rec.config.jobs[0]
            rows = job_cfg.tokens_per_micro_batch // job_cfg.max_seq_len
            if rows == 1:
                assert isinstance(a, decisions.Fail) and "already one row" in a.error
            else:
                smaller = a.config.jobs[0]
                assert isinstance(a, decisions.Requeue)
                assert smaller.tokens_per_micro_batch * smaller.optimizer.grad_accumulation == \
                    job_cfg.tokens_per_micro_batch * job_cfg.optimizer.grad_accumulation


@pytest.mark.parametrize("seed", range(20))
def test_a_higher_priority_job_preempts_the_fewest_lower_ones_and_never_an_equal(seed):
    rng = random.Random(seed)
    stages = rng.choice([1, 2])
    view = decisions.ReplicaView("r0", True, None, {}, nodes=("n",) * stages)
    for i in range(rng.randint(1, 3)):
        rec = record(rng, i, JobState.RUNNING, BASES[0], "r0")
        view.jobs[rec.id] = rec
        view.base = base_of(rec)
    new = record(rng, 9, JobState.QUEUED, BASES[0])
    shapes = {j: decisions.request(r).shape for j, r in view.jobs.items()}
    state = ReplicaState("r0", MODEL, 0, shapes, stages)
    # room for the new job only once some running job leaves
    alone = ReplicaState("r0", MODEL, 0, {}, stages).peak(DEFAULT_COEFFICIENTS, decisions.request(new))
    view.budget = max(alone, state.peak(DEFAULT_COEFFICIENTS)) + 1
    if state.peak(DEFAULT_COEFFICIENTS, decisions.request(new)) <= view.budget:
        view.budget = state.peak(DEFAULT_COEFFICIENTS, decisions.request(new)) - 1
    lower = max(r.priority for r in view.jobs.values())
    for priority, expect in ((lower + 1, True), (min(r.priority for r in view.jobs.values()), False)):
        new = dataclasses.replace(new, priority=priority)
        actions = decisions.schedule([new], [view], lambda cfg: MODEL, DEFAULT_COEFFICIENTS,
                                     decisions.Policy(), 100.0)
        preempted = [a.job for a in actions if isinstance(a, decisions.Preempt)]
        if not expect:
            assert preempted == [] and not any(isinstance(a, decisions.Place) for a in actions)
            continue
        assert preempted and isinstance(actions[-1], decisions.Place) and actions[-1].job == new.id
        assert all(view.jobs[v].priority < priority for v in preempted)
        left = {j: s for j, s in shapes.items() if j not in preempted}
        fits = ReplicaState("r0", MODEL, view.budget, left, stages)
        assert fits.peak(DEFAULT_COEFFICIENTS, decisions.request(new)) <= view.budget


@pytest.mark.parametrize("seed", range(20))
def test_auto_stages_regroup_idle_replicas_for_a_job_too_big_for_one_device(seed):
    from rayft.scheduler.stages import fewest_stages

    rng = random.Random(seed)
    slots = rng.randint(2, 6)
    new = record(rng, 99, JobState.QUEUED, BASES[0])
    req = decisions.request(new)
    one = ReplicaState("p", MODEL, 0, {}, 1).peak(DEFAULT_COEFFICIENTS, req)
    budget = int(one * rng.uniform(0.3, 0.95))  # too small for the job on one device
    need = fewest_stages(MODEL, {req.name: req.shape}, budget, DEFAULT_COEFFICIENTS, most=slots)
    busy = rng.randint(0, slots)
    views = []
    for k in range(slots):
        v = decisions.ReplicaView(f"n-{k}", True, None, {}, budget, nodes=("n",))
        if k < busy:
            rec = record(rng, k, JobState.RUNNING, BASES[0], v.name)
            v.jobs[rec.id], v.base = rec, base_of(rec)
        views.append(v)
    policy = decisions.Policy(auto=True)
    nodes = [decisions.NodeView("n", slots)]
    actions = decisions.schedule([new], views, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 100.0, nodes)
    if need is None:
        (a,) = actions
        assert isinstance(a, decisions.Fail) and "no node has devices enough" in a.error
    elif slots - busy >= need:
        (a,) = actions
        assert isinstance(a, decisions.Regroup) and a.stages == need and len(a.replicas) == need
        assert all(not views[int(n.split("-")[1])].jobs for n in a.replicas), "only idle replicas"
    else:
        assert actions == [], "it waits for replicas to free up"
    # once regrouped, the job is placed on the staged replica
    if need is not None:
        staged = decisions.ReplicaView("n-0", True, None, {}, budget, nodes=("n",) * need)
        (a,) = decisions.schedule([new], [staged], lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 100.0, nodes)
        assert isinstance(a, decisions.Place) and a.replica == "n-0"


def draw_nodes(rng: random.Random) -> list[decisions.NodeView]:
    return [decisions.NodeView(f"node{k}", rng.randint(0, 5), gpu=rng.random() < 0.5, refused=rng.random() < 0.15)
            for k in range(rng.randint(1, 5))]


@pytest.mark.parametrize("seed", range(40))
def test_lifecycle_drops_replicas_of_gone_nodes_and_fills_every_slot_it_can(seed):
    rng = random.Random(seed)
    nodes = draw_nodes(rng)
    policy = decisions.Policy(auto=rng.random() < 0.3, stages=rng.randint(1, 4))
    per = 1 if policy.auto else policy.stages
    gone = ["gone0", "gone1"]
    replicas = []
    for k in range(rng.randint(0, 4)):  # some running replicas, some on nodes that left
        where = [n.id for n in nodes] + gone
        replicas.append(decisions.ReplicaView(f"r{k}", True, None, {}, nodes=tuple(rng.choice(where) for _ in range(per))))
    actions = decisions.lifecycle(nodes, replicas, policy)
    lost = {a.replica for a in actions if isinstance(a, decisions.LoseReplica)}
    assert lost == {r.name for r in replicas if set(r.nodes) & set(gone)}
    starts = [a for a in actions if isinstance(a, decisions.StartReplica)]
    kind = {n.id: n.gpu for n in nodes}
    used = {n.id: 0 for n in nodes}
    for r in replicas:
        if r.name not in lost:
            for n in r.nodes:
                used[n] += 1
    for a in starts:
        assert len(a.nodes) == per
        assert len({kind[n] for n in a.nodes}) == 1 and a.gpu == kind[a.nodes[0]], "one kind of device per replica"
        changes = sum(x != y for x, y in zip(a.nodes, a.nodes[1:]))
        assert changes == len(set(a.nodes)) - 1, "a node's stages are consecutive"
        for n in a.nodes:
            used[n] += 1
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.refused:
            assert all(n.id not in a.nodes for a in starts), "nothing starts where a replica failed to start"
        else:
            assert used[n.id] <= n.slots or not any(n.id in a.nodes for a in starts), "no slot given twice"
    for gpu in (True, False):  # what is left of each kind could not make one more replica
        left = sum(max(by_id[i].slots - used[i], 0) for i in used if by_id[i].gpu == gpu and not by_id[i].refused)
        assert left < per
    # a replica spans nodes only when none of them alone had room for one
    for a in starts:
        if len(set(a.nodes)) > 1:
            assert all(by_id[n].slots - used[n] < per for n in a.nodes)


def test_auto_regroups_idle_replicas_across_nodes_when_no_node_has_devices_enough():
    """One device per node: a job that needs two stages gets one stage on each of two nodes; where
    one node has two idle replicas, both stages go there."""
    new = record(random.Random(0), 99, JobState.QUEUED, BASES[0])
    req = decisions.request(new)
    one = ReplicaState("p", MODEL, 0, {}, 1).peak(DEFAULT_COEFFICIENTS, req)
    two = max(e.total for e in __import__("rayft.scheduler.stages", fromlist=["x"]).stage_estimates(
        MODEL, {req.name: req.shape}, 2, DEFAULT_COEFFICIENTS))
    budget = (one + two) // 2  # needs two stages
    policy = decisions.Policy(auto=True)
    spread = [decisions.ReplicaView(f"r{k}", True, None, {}, budget, nodes=(f"n{k}",)) for k in range(3)]
    nodes = [decisions.NodeView(f"n{k}", 1) for k in range(3)]
    (a,) = decisions.schedule([new], spread, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 0.0, nodes)
    assert isinstance(a, decisions.Regroup) and len(a.replicas) == 2 and len(set(a.nodes)) == 2
    assert list(a.nodes) == [next(v.node for v in spread if v.name == r) for r in a.replicas]
    # GPU and CPU nodes never share a replica
    mixed = [decisions.NodeView("n0", 1, gpu=True), decisions.NodeView("n1", 1), decisions.NodeView("n2", 1, gpu=True)]
    (a,) = decisions.schedule([new], spread, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 0.0, mixed)
    assert set(a.nodes) == {"n0", "n2"}
    # a node with two idle replicas takes both stages
    packed = spread + [decisions.ReplicaView("r9", True, None, {}, budget, nodes=("n2",))]
    nodes[2] = decisions.NodeView("n2", 2)
    (a,) = decisions.schedule([new], packed, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 0.0, nodes)
    assert a.nodes == ("n2", "n2")


@pytest.mark.parametrize("seed", range(30))
def test_auto_stops_an_idle_staged_replica_only_when_no_waiting_job_needs_it(seed):
    from rayft.scheduler.stages import fewest_stages

    rng = random.Random(seed)
    policy = decisions.Policy(auto=True)
    big = record(rng, 1, JobState.QUEUED, BASES[0])
    req = decisions.request(big)
    one = ReplicaState("p", MODEL, 0, {}, 1).peak(DEFAULT_COEFFICIENTS, req)
    budget = int(one * rng.uniform(0.3, 0.95))
    need = fewest_stages(MODEL, {req.name: req.shape}, budget, DEFAULT_COEFFICIENTS, most=8)
    if need is None:
        return
    stages = rng.randint(2, 6)
    staged = decisions.ReplicaView("s", True, None, {}, budget, nodes=("n",) * stages)
    smalls = (record(rng, 2, JobState.QUEUED, BASES[0]) for _ in range(100))
    small = next((s for s in smalls if ReplicaState("p", MODEL, 0, {}, 1).peak(
        DEFAULT_COEFFICIENTS, decisions.request(s)) <= budget), None)
    if small is None:
        return
    single = decisions.ReplicaView("r", True, None, {}, budget, nodes=("m",))  # devices of one size
    nodes = [decisions.NodeView("n", stages), decisions.NodeView("m", 1)]
    queue = rng.choice([[], [small], [big], [big, small]])
    actions = decisions.schedule(queue, [staged, single], lambda cfg: MODEL, DEFAULT_COEFFICIENTS, policy, 0.0, nodes)
    stopped = [a for a in actions if isinstance(a, decisions.StopReplica)]
    placed_on_staged = any(isinstance(a, decisions.Place) and a.replica == "s" for a in actions)
    big_fits = big in queue and stages >= need
    assert bool(stopped) == (not big_fits and not placed_on_staged), actions
    if big_fits:
        assert any(isinstance(a, decisions.Place) and a.job == big.id and a.replica == "s" for a in actions)
    # a busy staged replica is never stopped, nor one not ready, nor any without auto
    busy = dataclasses.replace(staged, jobs={big.id: big}, base=base_of(big))
    for views, pol in [([busy, single], policy), ([dataclasses.replace(staged, ready=False), single], policy),
                       ([staged, single], decisions.Policy(stages=stages))]:
        acts = decisions.schedule(queue, views, lambda cfg: MODEL, DEFAULT_COEFFICIENTS, pol, 0.0, nodes)
        assert not any(isinstance(a, decisions.StopReplica) for a in acts)


@pytest.mark.parametrize("seed", range(20))
def test_a_replica_s_memory_is_the_memory_model_s_estimate_per_stage_beside_its_budget(seed):
    """What the dashboard shows per replica: each stage's estimated peak for the jobs it holds (the
    scheduler's own numbers), its budget; an idle replica or an unreadable base shows no stages."""
    from rayft.scheduler.stages import stage_estimates

    rng = random.Random(seed)
    stages = rng.choice([1, 1, 2, 4])
    replicas, _ = draw_cluster(rng, stages)
    for view in replicas:
        got = decisions.replica_memory(view, lambda cfg: MODEL, DEFAULT_COEFFICIENTS)
        assert got["budget"] == view.budget
        if not view.jobs:
            assert got["stages"] == []
            continue
        jobs = {j: decisions.request(rec).shape for j, rec in view.jobs.items()}
        assert got["stages"] == [int(e.total) for e in stage_estimates(MODEL, jobs, stages, DEFAULT_COEFFICIENTS)]
        assert len(got["stages"]) == stages and all(b > 0 for b in got["stages"])

        def unreadable(cfg):
            raise OSError("no config.json")

        assert decisions.replica_memory(view, unreadable, DEFAULT_COEFFICIENTS)["stages"] == []
