"""Staged replicas on a real local Ray (stage actors, a placement group, gloo): a job trained on 2 or
3 stages gives the per-step losses and the final adapter it gets on one stage, over generated mixes
of variants, ranks, dropout, clipping, accumulation, LoRA+, lengths and jobs joining and leaving;
its checkpoint resumes on any stage count; a dead stage takes its whole group down, never a hang."""

import os
import random
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import run_config
from safetensors.torch import load_file

from rayft.cluster.staged import StagedReplica, placement_strategy
from rayft.train.trainer import Trainer

CASES = 8  # per stage count


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, namespace="rayft-staged-test", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("staged-store")


@pytest.fixture(scope="module")
def groups(local_ray, tiny_model_dir, task_files, storage):
    """A 2-stage and a 3-stage replica of the tiny model (4 decoder layers), sharing one storage root."""
    base = run_config(tiny_model_dir, task_files, {"upper": {}}).base_model
    actor = ray.remote(StagedReplica).options(num_cpus=0, max_concurrency=1)
    made = {s: actor.remote(None, str(storage), s, base=base, cpus_per_stage=0.25) for s in (2, 3)}
    for g in made.values():
        ray.get(g.status.remote())
    yield made
    for g in made.values():
        ray.get(g.shutdown.remote())
        ray.kill(g, no_restart=True)


def draw_case(rng: random.Random, tag: str) -> tuple[list[tuple[int, str, dict]], list[int]]:
    """(call it joins before, job id, job settings) for 1 to 3 jobs (some CPO or ORPO jobs), and the
    steps each call asks for (a staged replica runs them in one pipeline, drained where a job ends or
    is due a checkpoint)."""
    jobs = []
    for k in range(rng.randint(1, 3)):
        variant = rng.choice(["lora", "lora", "rslora", "dora", "vera"])
        adapter = {"variant": "lora" if variant == "rslora" else variant, "r": rng.choice([2, 4]),
                   "dropout": rng.choice([0.0, 0.0, 0.1]), "use_rslora": variant == "rslora"}
        if variant == "vera":
            adapter["r"] = 8
        job = {"task": rng.choice(["upper", "reverse", "double"]), "steps": rng.randint(2, 5), "adapter": adapter,
               "max_seq_len": rng.choice([32, 64]), "tokens_per_micro_batch": rng.choice([64, 128]),
               "checkpoint_every": rng.choice([None, None, 2]),
               "optimizer": {"grad_accumulation": rng.choice([1, 1, 2, 3]), "max_grad_norm": rng.choice([None, 0.3]),
                             "loraplus_lr_ratio": rng.choice([None, None, 4.0]), "lr": 0.01},
               "seed": rng.randint(0, 99)}
        if rng.random() < 0.25:  # a preference job: CPO or ORPO, its loss on the last stage
            job.update(task="prefer_chat", objective=rng.choice(["cpo", "orpo"]),
                       tokens_per_micro_batch=2 * job["max_seq_len"])
        jobs.append((0 if k == 0 else rng.randint(0, 2), f"{tag}j{k}", job))
    return jobs, [rng.choice([1, 2, 4]) for _ in range(20)]


def one_job_config(tiny_model_dir, task_files, job_id, job):
    return run_config(tiny_model_dir, task_files, {job_id: job})


def drive(add, step, case, tiny_model_dir, task_files):
    """Add each job before its call, call for steps until all are done; each job's losses, step by step."""
    jobs, calls = case
    losses: dict[str, list[float]] = {}
    pending = sorted(jobs, key=lambda j: j[0])
    for t, n in enumerate(calls):
        while pending and pending[0][0] <= t:
            _, job_id, job = pending.pop(0)
            add(job_id, one_job_config(tiny_model_dir, task_files, job_id, job))
            losses[job_id] = []
        rows = step(n)
        for name, loss in rows:
            losses[name].append(loss)
        if not rows and not pending:
            return losses
    raise AssertionError("jobs did not finish")


def reference(tiny_model_dir, task_files, case, out: Path):
    """The same jobs, joining at the same calls, on one process holding the whole model."""
    jobs = case[0]
    base = one_job_config(tiny_model_dir, task_files, jobs[0][1], jobs[0][2]).base_model
    trainer = Trainer(base, out)

    def step(n):
        return [(name, r.loss) for stats in trainer.steps(n) for name, r in stats.records.items()]

    losses = drive(lambda job_id, cfg: trainer.add_job(cfg.jobs[0], cfg, out / job_id), step, case,
                   tiny_model_dir, task_files)
    return losses, {job_id: out / job_id / "adapters" / job_id for _, job_id, _ in jobs}


def staged(group, case, tiny_model_dir, task_files, storage):
    jobs = case[0]

    def add(job_id, cfg):
        st = ray.get(group.add_job.remote(job_id, cfg.model_dump_json()))
        assert st["state"] == "running", st

    def step(n):
        return [(row[0], row[2]) for row in ray.get(group.step.remote(n))["rows"]]  # (job, step, loss, ...)

    losses = drive(add, step, case, tiny_model_dir, task_files)
    return losses, {job_id: storage / "jobs" / job_id / "adapters" / job_id for _, job_id, _ in jobs}


def assert_same_adapter(a: Path, b: Path, tol=1e-4):
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # fused beside other jobs on one stage, alone per micro-batch on stages: rounding differs
        assert float((wa[k] - wb[k]).norm() / wb[k].norm().clamp_min(1e-12)) < tol, k
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()


@pytest.mark.parametrize("stages,case", [(s, c) for s in (2, 3) for c in range(CASES)])
def test_a_job_on_stages_equals_it_on_one(stages, case, groups, tiny_model_dir, task_files, storage, tmp_path):
    drawn = draw_case(random.Random(f"{stages}-{case}"), f"s{stages}c{case}")
    want_losses, want_adapters = reference(tiny_model_dir, task_files, drawn, tmp_path / "one")
    got_losses, got_adapters = staged(groups[stages], drawn, tiny_model_dir, task_files, storage)
    assert got_losses.keys() == want_losses.keys()
    for job_id in want_losses:
        assert got_losses[job_id] == pytest.approx(want_losses[job_id], rel=1e-5), job_id
        assert_same_adapter(got_adapters[job_id], want_adapters[job_id])


def test_a_checkpoint_resumes_on_any_stage_count(groups, tiny_model_dir, task_files, storage, tmp_path):
    job = {"task": "reverse", "steps": 6, "adapter": {"variant": "dora", "r": 4, "dropout": 0.1},
           "optimizer": {"grad_accumulation": 2, "max_grad_norm": 0.3, "loraplus_lr_ratio": 4.0}}
    want_losses, want = reference(tiny_model_dir, task_files, ([(0, "hop", job)], [1] * 10), tmp_path / "one")
    cfg = one_job_config(tiny_model_dir, task_files, "hop", job).model_dump_json()
    losses = []
    # 2 steps on 2 stages, 2 on 3 stages, the rest on one process: each hop resumes the last checkpoint
    for g in (groups[2], groups[3]):
        assert ray.get(g.add_job.remote("hop", cfg))["state"] == "running"
        for _ in range(2):
            losses += [row[2] for row in ray.get(g.step.remote(1))["rows"]]
        assert ray.get(g.remove_job.remote("hop"))["state"] == "preempted"
    one = Trainer(run_config(tiny_model_dir, task_files, {"upper": {}}).base_model, tmp_path / "unused")
    rc = one_job_config(tiny_model_dir, task_files, "hop", job)
    st = one.add_job(rc.jobs[0], rc, storage / "jobs" / "hop")
    assert st.resumed_from == 4, st
    while one.running:
        losses += [r.loss for r in one.step().records.values()]
    assert losses == pytest.approx(want_losses["hop"], rel=1e-5)
    assert_same_adapter(storage / "jobs" / "hop" / "adapters" / "hop", want["hop"])


def test_a_staged_adapter_loads_in_peft(groups, tiny_model_dir, task_files, storage):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.adapters import AdapterModel, load_adapter

    job = {"task": "upper", "steps": 2, "adapter": {"variant": "lora", "r": 4}}
    cfg = one_job_config(tiny_model_dir, task_files, "peftcheck", job).model_dump_json()
    ray.get(groups[3].add_job.remote("peftcheck", cfg))
    while ray.get(groups[3].step.remote(1))["running"]:
        pass
    path = storage / "jobs" / "peftcheck" / "adapters" / "peftcheck"
    ids = torch.randint(3, 60, (2, 9))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = AdapterModel(base)
    load_adapter(ours, path, "peftcheck")
    with torch.no_grad(), ours.use("peftcheck", rows=2):
        want = base(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), path)
    with torch.no_grad():
        got = peft(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert float((got - base(ids).logits).abs().max()) > 1e-4, "the trained adapter changes the output"


def test_a_killed_stage_tears_its_group_down_without_a_hang(local_ray, tiny_model_dir, task_files, tmp_path):
    base = run_config(tiny_model_dir, task_files, {"upper": {}}).base_model
    group = ray.remote(StagedReplica).options(num_cpus=0, max_concurrency=1).remote(
        None, str(tmp_path), 2, base=base, cpus_per_stage=0.25)
    cfg = one_job_config(tiny_model_dir, task_files, "long", {"steps": 10_000, "task": "upper"}).model_dump_json()
    ray.get(group.add_job.remote("long", cfg))
    last_pid = ray.get(group.step.remote(1))["pid"]
    stage_pids = ray.get(group.stage_pids.remote())
    assert last_pid == stage_pids[-1] and len(set(stage_pids)) == 2
    pg = ray.get(group.layout.remote())["placement_group"]
    running = group.step.remote(10_000)
    time.sleep(1.0)
    os.kill(stage_pids[0], signal.SIGKILL)  # the first stage crashes mid-step; the second waits on it
    t0 = time.time()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(running, timeout=60)
    assert time.time() - t0 < 30
    deadline = time.time() + 30
    while time.time() < deadline:  # the surviving stage is killed with the group
        try:
            os.kill(stage_pids[1], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the second stage outlived its group")
    assert ray.util.placement_group_table()[pg]["state"] == "REMOVED"


def test_stages_pack_on_one_node_where_it_has_room():
    nodes = [{"Alive": True, "Resources": {"CPU": 4, "GPU": 2}}, {"Alive": True, "Resources": {"CPU": 8, "GPU": 4}}]
    assert placement_strategy({"CPU": 1, "GPU": 1}, 4, nodes) == "STRICT_PACK"
    assert placement_strategy({"CPU": 1, "GPU": 1}, 6, nodes) == "PACK"
    assert placement_strategy({"CPU": 2}, 4, [{"Alive": False, "Resources": {"CPU": 64}}]) == "PACK"


@pytest.mark.parametrize("mode", ["controller", "embedded"])
def test_out_of_memory_on_a_stage_shrinks_the_biggest_job_and_every_job_ends_as_if_it_never_happened(
        mode, local_ray, tiny_model_dir, task_files, tmp_path):
    """A stage runs out of memory mid-pipeline (its neighbour blocked on it): the group is rebuilt,
    the job with the biggest micro-batch gives way (for a controller reported "oom" and requeued
    smaller by `decisions.out_of_memory`; for `rayft train` put back at once with half the rows),
    the other resumes from its checkpoint; both end equal to straight runs."""
    from rayft.cluster import decisions
    from rayft.cluster.replica import ReplicaWorker
    from rayft.store.registry import JobRecord
    from rayft.train.trainer import Trainer

    marker = tmp_path / "oom-once"

    class OutOfMemoryOnce(ReplicaWorker):  # pickled by value: a local class
        def step(self, n=1):
            if self.stage_at[0] == 1 and self.trainer is not None and any(
                    j.step >= 2 for j in self.trainer.jobs.values()) and not marker.exists():
                marker.write_text("")
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().step(n)

    jobs = {"big": {"steps": 6, "max_seq_len": 32, "tokens_per_micro_batch": 128, "checkpoint_every": 2,
                    "task": "upper", "optimizer": {"max_grad_norm": 0.5}},
            "small": {"steps": 6, "max_seq_len": 32, "tokens_per_micro_batch": 32, "checkpoint_every": 2,
                      "task": "reverse", "adapter": {"variant": "dora"}}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.run()
    actor = ray.remote(StagedReplica).options(num_cpus=0, max_concurrency=1)
    if mode == "embedded":
        group = actor.remote(cfg, str(tmp_path / "run"), 2, cpus_per_stage=0.25, worker=OutOfMemoryOnce)
        ray.get(group.status.remote())
        seen = []
        while True:
            report = ray.get(group.step.remote(1))
            seen += report["jobs"]
            if not report["running"]:
                break
        final = {st["name"]: st for st in ray.get(group.status.remote())}
        assert final["big"]["state"] == final["small"]["state"] == "done"
        assert any("out of memory at tokens_per_micro_batch=128 on a pipeline stage: retried with "
                   "tokens_per_micro_batch=64, grad_accumulation=2" in w for w in final["big"]["warnings"])
        adapters = {name: tmp_path / "run" / "adapters" / name for name in jobs}
    else:
        from rayft.store.registry import job_config

        store = tmp_path / "store"
        group = actor.remote(None, str(store), 2, cpus_per_stage=0.25, worker=OutOfMemoryOnce)
        for name in jobs:
            assert ray.get(group.add_job.remote(name, job_config(cfg, name).model_dump_json()))["state"] == "running"
        states = {}
        while not states.get("big") == "oom":
            report = ray.get(group.report.remote(1))
            states.update({st["name"]: st["state"] for st in report["jobs"]})
        gave_way = next(st for st in report["jobs"] if st["name"] == "big")
        assert "out of memory at tokens_per_micro_batch=128 on a pipeline stage" in gave_way["error"]
        assert states["small"] == "running" and ray.get(group.holds.remote())["jobs"][0]["name"] == "small"
        rec = JobRecord("big", "big", "big", job_config(cfg, "big"), "running", 0, 0, 6, "g", None, 0.0, 0.0)
        requeue = decisions.out_of_memory(rec, gave_way["error"])  # what the controller does with it
        assert requeue.config.jobs[0].tokens_per_micro_batch == 64
        assert ray.get(group.add_job.remote("big", requeue.config.model_dump_json()))["resumed_from"] >= 2
        while report["running"]:
            report = ray.get(group.report.remote(1))
            states.update({st["name"]: st["state"] for st in report["jobs"]})
        assert states == {"big": "done", "small": "done"}
        adapters = {name: store / "jobs" / name / "adapters" / name for name in jobs}
    assert marker.exists(), "the fault was injected"
    for name in jobs:
        assert_same_adapter(adapters[name], tmp_path / "straight" / "adapters" / name, tol=1e-3)
    ray.get(group.shutdown.remote())
    ray.kill(group, no_restart=True)


def test_the_draws_put_preference_jobs_on_stages_and_dpo_is_refused_there_by_name(groups, tiny_model_dir, task_files):
    objectives = {j.get("objective") for s in (2, 3) for c in range(CASES)
                  for _, _, j in draw_case(random.Random(f"{s}-{c}"), "x")[0]}
    assert {"cpo", "orpo"} <= objectives
    cfg = one_job_config(tiny_model_dir, task_files, "dpo1", {"task": "prefer", "objective": "dpo"})
    st = ray.get(groups[2].add_job.remote("dpo1", cfg.model_dump_json()))
    assert st["state"] == "failed" and "task dpo: not on pipeline stages yet (cpo and orpo are)" in st["error"]
