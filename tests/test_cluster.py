"""The controller on a real local Ray: jobs placed on replicas, restarts, killed replicas, preemption,
cancel, bad input. Every resumed job must end with the adapter of an uninterrupted run."""

import re
import time
import urllib.request

import pytest
import ray
from conftest import run_config
from safetensors.torch import load_file

from rayft.cluster.controller import get_controller
from rayft.config import BaseModelConfig, ClusterConfig
from rayft.model.shape import model_shape
from rayft.scheduler.memory import GIB, estimate
from rayft.scheduler.plan import job_shapes
from rayft.train.trainer import Trainer

TERMINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, namespace="rayft", include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 500})
    yield
    ray.shutdown()


@pytest.fixture
def controller(local_ray, tmp_path):
    made = []

    def make(**settings):
        ctl = get_controller(ClusterConfig(storage=str(tmp_path / "store"), poll_s=0.05, **settings))
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        try:
            ray.get(ctl.shutdown.remote(), timeout=60)
        except Exception:
            pass
        ray.kill(ctl, no_restart=True)
    # a killed controller leaves its detached replicas; none may leak into the next test
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "rayft":
            try:
                ray.kill(ray.get_actor(a["name"], namespace="rayft"), no_restart=True)
            except ValueError:
                pass  # listed while it was dying: already gone
    time.sleep(0.5)


def submit(ctl, cfg, files=()):
    return ray.get(ctl.submit.remote(cfg.model_dump_json(), {str(p): p.read_bytes() for p in files}))


def wait_for(ctl, predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            st = ray.get(ctl.status.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)  # a controller restarting
            continue
        jobs = {j["id"]: j for j in st["jobs"]}
        if predicate(jobs, st):
            return jobs, st
        time.sleep(0.1)
    raise AssertionError(f"timed out; last status: {st}")


def all_over(ids):
    return lambda jobs, _: all(jobs[i]["state"] in TERMINAL for i in ids)


def adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def straight_adapter(tiny_model_dir, task_files, jobs, name, tmp_path):
    """The adapter of an uninterrupted run of one job, alone, in-process."""
    t = Trainer(run_config(tiny_model_dir, task_files, {name: jobs[name]}), tmp_path / f"straight-{name}")
    t.run()
    return adapter_weights(tmp_path / f"straight-{name}" / "adapters" / name)


def assert_same_adapter(a, b, tol=1e-4):
    assert a.keys() == b.keys()
    for k in a:  # fused beside other jobs, float rounding differs a little
        assert float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) < tol, k


def test_jobs_run_on_replicas_with_metrics_and_end_with_the_uninterrupted_adapter(
        controller, tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 6, "checkpoint_every": 2}, "reverse": {"steps": 4, "max_seq_len": 32}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    ctl = controller(cpu_replicas_per_node=2)
    ids = submit(ctl, cfg, [task_files["upper"], task_files["reverse"]])
    jobs_now, st = wait_for(ctl, all_over(ids))
    assert [jobs_now[i]["state"] for i in ids] == ["done", "done"]
    assert {r["name"] for r in st["replicas"]} == {r["name"] for r in st["replicas"] if r["name"].startswith("rayft-replica-")}
    assert len(st["replicas"]) == 2
    history = ray.get(ctl.metrics_history.remote(ids[0]))
    assert [h[0] for h in history] == [1, 2, 3, 4, 5, 6] and all(h[1] > 0 and h[2] > 0 for h in history)
    for job_id, name in zip(ids, ("upper", "reverse")):
        from pathlib import Path

        got = adapter_weights(Path(jobs_now[job_id]["adapter_path"]))
        assert_same_adapter(got, straight_adapter(tiny_model_dir, task_files, jobs, name, tmp_path))
    with pytest.raises(ray.exceptions.RayTaskError, match="no job with id 'nope'"):
        ray.get(ctl.metrics_history.remote("nope"))

    # the per-job gauges reach the node's Prometheus endpoint (what the dashboard's Grafana reads)
    want = [rf'ray_rayft_job_step{{[^}}]*job="{ids[0]}"[^}}]*replica="rayft-replica-[^"]+"[^}}]*}} 6\.0',
            rf'ray_rayft_job_state{{[^}}]*job="{ids[1]}"[^}}]*state="done"[^}}]*}} 1\.0',
            rf'ray_rayft_job_tokens_per_second{{[^}}]*job="{ids[0]}"',
            rf'ray_rayft_job_loss{{[^}}]*job="{ids[1]}"']
    port = ray.nodes()[0]["MetricsExportPort"]
    for _ in range(60):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        missing = [w for w in want if not re.search(w, body)]
        if not missing:
            break
        time.sleep(0.5)
    assert not missing, missing


def test_a_killed_controller_comes_back_and_loses_no_job_or_progress(controller, tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 200}}  # no checkpoint interval: only the adopted replica keeps its progress
    cfg = run_config(tiny_model_dir, task_files, jobs)
    ctl = controller()
    (job_id,) = submit(ctl, cfg, [task_files["upper"]])
    wait_for(ctl, lambda j, _: j[job_id]["step"] >= 3)
    ray.kill(ctl, no_restart=False)  # a crash: Ray restarts the detached actor, which reopens the registry
    wait_for(ctl, lambda j, st: any("adopted replica" in e for e in st["events"]))
    # the same config again, attaching (a re-run RayJob): it follows the live job instead of a second one
    assert ray.get(ctl.submit.remote(cfg.model_dump_json(), {}, True)) == [job_id]
    other = run_config(tiny_model_dir, task_files, {"upper": {"steps": 201}})
    with pytest.raises(ray.exceptions.RayTaskError, match="already queued or running under these names: upper"):
        ray.get(ctl.submit.remote(other.model_dump_json(), {}, True))
    jobs_now, st = wait_for(ctl, all_over([job_id]))
    assert jobs_now[job_id]["state"] == "done" and jobs_now[job_id]["step"] == 200
    assert any("adopted replica" in e and "1 job(s)" in e for e in st["events"])
    assert not any("requeued" in e for e in st["events"]), "the job never went back to the queue"
    from pathlib import Path

    assert_same_adapter(adapter_weights(Path(jobs_now[job_id]["adapter_path"])),
                        straight_adapter(tiny_model_dir, task_files, jobs, "upper", tmp_path), tol=1e-6)


def test_a_killed_replica_jobs_resume_elsewhere_from_their_checkpoint(controller, tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 10, "checkpoint_every": 2, "adapter": {"dropout": 0.1}}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    ctl = controller(cpu_replicas_per_node=2)
    (job_id,) = submit(ctl, cfg, [task_files["upper"]])
    jobs_now, _ = wait_for(ctl, lambda j, _: j[job_id]["step"] >= 3)
    victim = jobs_now[job_id]["replica"]
    ray.kill(ray.get_actor(victim, namespace="rayft"), no_restart=True)
    jobs_now, st = wait_for(ctl, all_over([job_id]))
    assert jobs_now[job_id]["state"] == "done"
    assert any(f"replica {victim} lost" in e and job_id in e for e in st["events"])
    from pathlib import Path

    assert_same_adapter(adapter_weights(Path(jobs_now[job_id]["adapter_path"])),
                        straight_adapter(tiny_model_dir, task_files, jobs, "upper", tmp_path), tol=1e-6)


def one_job_budget_gib(a, b, model_dir):
    """A CPU replica memory that holds either job alone but not both (at the default 90% budget)."""
    model = model_shape(a.base_model)
    shapes = {**job_shapes(a), **job_shapes(b)}
    alone = max(estimate(model, {n: s}).total for n, s in shapes.items())
    both = estimate(model, shapes).total
    assert both > alone
    return (alone + both) / 2 / 0.9 / GIB


def test_higher_priority_preempts_and_the_preempted_job_resumes_exactly(controller, tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 30, "checkpoint_every": 5}}
    low = run_config(tiny_model_dir, task_files, jobs)
    high = run_config(tiny_model_dir, task_files, {"reverse": {"steps": 3, "priority": 5}})
    ctl = controller(cpu_replica_memory_gib=one_job_budget_gib(low, high, tiny_model_dir))
    (low_id,) = submit(ctl, low, [task_files["upper"]])
    wait_for(ctl, lambda j, _: j[low_id]["step"] >= 2)
    (high_id,) = submit(ctl, high, [task_files["reverse"]])
    jobs_now, st = wait_for(ctl, all_over([low_id, high_id]))
    assert jobs_now[low_id]["state"] == jobs_now[high_id]["state"] == "done"
    assert any(f"preempted {low_id}" in e for e in st["events"])
    # the high-priority job finished first; the low one resumed after it
    assert jobs_now[high_id]["updated_at"] < jobs_now[low_id]["updated_at"]
    from pathlib import Path

    assert_same_adapter(adapter_weights(Path(jobs_now[low_id]["adapter_path"])),
                        straight_adapter(tiny_model_dir, task_files, jobs, "upper", tmp_path), tol=1e-6)


def test_bad_input_fails_alone_and_cancel_stops_one_job(controller, tiny_model_dir, task_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    files = {**task_files, "bad": bad}
    cfg = run_config(tiny_model_dir, files, {"upper": {"steps": 6}, "broken": {"task": "bad"},
                                              "reverse": {"steps": 400}})
    ctl = controller()
    ids = submit(ctl, cfg, [task_files["upper"], task_files["reverse"], bad])
    # an invalid config is refused with its errors; the submitted jobs carry on
    with pytest.raises(ray.exceptions.RayTaskError, match="jobs.0.steps"):
        ray.get(ctl.submit.remote(cfg.model_dump_json().replace('"steps":6', '"steps":-1')))
    with pytest.raises(ray.exceptions.RayTaskError, match="already queued or running under these names: upper"):
        submit(ctl, cfg)
    up, broken, rev = ids
    jobs_now, _ = wait_for(ctl, lambda j, _: j[up]["state"] == "done" and j[broken]["state"] == "failed")
    assert "bad.jsonl: line 2: missing field 'output'" in jobs_now[broken]["error"]
    assert jobs_now[rev]["state"] == "running"
    assert ray.get(ctl.cancel.remote(rev)) == "cancelled"
    jobs_now, st = wait_for(ctl, lambda j, st: all(not r["jobs"] for r in st["replicas"]))
    assert jobs_now[rev]["state"] == "cancelled" and jobs_now[rev]["step"] < 400
    assert ray.get(ctl.cancel.remote(up)) == "done", "cancelling a finished job changes nothing"


def test_an_out_of_memory_job_is_requeued_with_smaller_micro_batches_then_fails_clearly(
        local_ray, tiny_model_dir, task_files, tmp_path):
    """The controller's side of an OOM (the replica's side, undoing the step, is in test_engine)."""
    from rayft.cluster.controller import Controller, _Replica

    ctl = Controller(ClusterConfig(storage=str(tmp_path / "store"), cpu_replicas_per_node=0).model_dump())
    ctl._stop.set()  # drive it by hand: no loop, no replicas
    ctl._thread.join()
    cfg = run_config(tiny_model_dir, task_files, {"upper": {"steps": 4, "tokens_per_micro_batch": 256}})
    (job_id,) = ctl.submit(cfg.model_dump_json())
    replica = _Replica("replica-x", None, ("node-x",), False, ready=None)

    def oom_report():
        replica.jobs[job_id] = ctl.registry.transition(job_id, "running", replica="replica-x")
        ctl._take_report(replica, {"rows": [], "jobs": [{
            "name": job_id, "state": "oom", "error": "out of memory at tokens_per_micro_batch=...",
            "step": 2, "total_steps": 4, "loss": 1.0, "tokens_per_s": 10.0}]})
        return ctl.registry.get(job_id)

    rec = oom_report()
    job = rec.config.jobs[0]
    assert rec.state == "queued" and (job.tokens_per_micro_batch, job.optimizer.grad_accumulation) == (128, 2)
    job = oom_report().config.jobs[0]
    assert (job.tokens_per_micro_batch, job.optimizer.grad_accumulation) == (64, 4)
    rec = oom_report()
    assert rec.state == "failed" and "already one row of max_seq_len=64" in rec.error
    assert not replica.jobs
    ctl.registry.close()


def test_a_job_whose_base_model_cannot_be_sized_fails_with_the_reason(local_ray, tiny_model_dir, task_files, tmp_path):
    from rayft.cluster.controller import Controller, _Replica

    ctl = Controller(ClusterConfig(storage=str(tmp_path / "store"), cpu_replicas_per_node=0).model_dump())
    ctl._stop.set()
    ctl._thread.join()
    no_config = tmp_path / "not-a-model"
    no_config.mkdir()
    cfg = run_config(tiny_model_dir, task_files, {"upper": {}}).model_copy(
        update={"base_model": BaseModelConfig(path=str(no_config), device="cpu")})
    (job_id,) = ctl.submit(cfg.model_dump_json())
    ctl.replicas["r"] = _Replica("r", None, ("node",), False, ready=None)
    ctl._schedule()
    rec = ctl.registry.get(job_id)
    assert rec.state == "failed" and f"cannot size the job: base model {no_config}: cannot read its config" in rec.error
    ctl.registry.close()


class _Recorder:
    """A stand-in replica actor that records the jobs the controller hands it."""

    def __init__(self):
        self.added = []
        outer = self

        class _Method:
            def remote(self, job_id, cfg_json):
                outer.added.append(job_id)

        self.add_job = _Method()


def _hand_driven_controller(tmp_path):
    from rayft.cluster.controller import Controller

    ctl = Controller(ClusterConfig(storage=str(tmp_path / "store"), cpu_replicas_per_node=0).model_dump())
    ctl._stop.set()  # drive it by hand: no loop, no replicas of its own
    ctl._thread.join()
    return ctl


def _hub_cache(root, repo_id, model_dir):
    """A Hugging Face hub cache holding only `repo_id`'s config.json (what sizing a job reads)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return root / "hub"


@pytest.mark.parametrize("base", ["local-dir", "cached-hub-id"])
def test_a_job_too_big_for_the_free_replica_waits_for_a_busy_big_one(local_ray, tiny_model_dir, task_files,
                                                                      tmp_path, monkeypatch, base):
    """Mixed replica sizes: the only replica big enough is busy with another base model, or still
    starting. The job waits (it fits that replica alone), runs there once it is free, and fails
    "does not fit" only when it is too big for every replica. Its base model may be a cached hub id."""
    import huggingface_hub

    from rayft.cluster.controller import _Replica

    cfg = run_config(tiny_model_dir, task_files, {"upper": {"tokens_per_micro_batch": 1024}})
    if base == "cached-hub-id":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE",
                            str(_hub_cache(tmp_path / "hf", "someorg/tiny-llama", tiny_model_dir)))
        cfg = cfg.model_copy(update={"base_model": cfg.base_model.model_copy(update={"path": "someorg/tiny-llama"})})
    ctl = _hand_driven_controller(tmp_path)
    need = estimate(model_shape(cfg.base_model), job_shapes(cfg)).total
    share = ctl.settings.memory_budget
    (job_id,) = ctl.submit(cfg.model_dump_json())
    small = _Replica("small", _Recorder(), ("node",), True, ready=None, device_memory=int(need / share * 0.99))
    big = _Replica("big", _Recorder(), ("node",), True, ready=None, device_memory=int(need / share * 3),
                   base='{"another": "base model"}', jobs={"other-job": None})
    starting = _Replica("starting", _Recorder(), ("node",), True, ready=object())  # its GPU size not known yet
    for replicas in ([small, big], [small, starting], [small, big, starting]):
        ctl.replicas = {r.name: r for r in replicas}
        ctl._schedule()
        assert ctl.registry.get(job_id).state == "queued", [r.name for r in replicas]
    assert not small.actor.added and not big.actor.added

    big.jobs, big.base = {}, None  # its job ended
    ctl._schedule()
    assert big.actor.added == [job_id] and ctl.registry.get(job_id).state == "running" and not small.actor.added

    (too_big,) = ctl.submit(cfg.model_copy(update={"jobs": [cfg.jobs[0].model_copy(update={"name": "huge"})]})
                            .model_dump_json())
    for r in (small, big):
        r.device_memory = int(need / share * 0.5)
    ctl.replicas = {"small": small, "big": big}
    ctl._schedule()
    rec = ctl.registry.get(too_big)
    assert rec.state == "failed" and "does not fit a replica" in rec.error and "every replica" in rec.error

    if base == "cached-hub-id":  # a hub id the cache lacks, offline: it fails, saying which model and why
        missing = cfg.model_copy(update={"base_model": cfg.base_model.model_copy(update={"path": "someorg/absent"}),
                                         "jobs": [cfg.jobs[0].model_copy(update={"name": "absent"})]})
        (absent,) = ctl.submit(missing.model_dump_json())
        ctl._schedule()
        rec = ctl.registry.get(absent)
        assert rec.state == "failed" and "cannot size the job: base model someorg/absent: cannot read its config" in rec.error
    ctl.registry.close()


def test_a_job_waits_for_the_big_replica_another_base_model_is_using_then_runs_there(
        local_ray, tiny_model_dir, task_files, tmp_path):
    """On a real local Ray: two replicas of different (GPU) sizes. A job of another base model runs on
    the big one; a job too big for the small one waits for it, then runs there to the end."""
    import shutil

    from rayft.cluster.controller import Controller

    other_dir = tmp_path / "tiny-copy"  # the same weights under another path: another base model
    shutil.copytree(tiny_model_dir, other_dir)
    first = run_config(other_dir, task_files, {"reverse": {"steps": 150}})
    second = run_config(tiny_model_dir, task_files, {"upper": {"steps": 3, "tokens_per_micro_batch": 256}})
    needs = [estimate(model_shape(c.base_model), job_shapes(c)).total for c in (first, second)]
    ctl = Controller(ClusterConfig(storage=str(tmp_path / "store"), cpu_replicas_per_node=2, poll_s=0.05).model_dump())
    jobs = lambda: {j["id"]: j for j in ctl.list_jobs()}  # noqa: E731

    def wait(predicate, timeout=180):
        deadline = time.time() + timeout
        while not predicate():
            assert time.time() < deadline, (jobs(), list(ctl.events))
            time.sleep(0.1)

    try:
        wait(lambda: len(st := ctl.status()["replicas"]) == 2 and all(r["ready"] for r in st))
        with ctl.lock:  # CPU replicas stand in for GPUs of two sizes
            small, big = sorted(ctl.replicas.values(), key=lambda r: r.name)
            small.device_memory = int(min(needs) / ctl.settings.memory_budget * 0.99)
            big.device_memory = int(max(needs) / ctl.settings.memory_budget * 3)
        (first_id,) = ctl.submit(first.model_dump_json(), {str(task_files["reverse"]): task_files["reverse"].read_bytes()})
        wait(lambda: jobs()[first_id]["step"] >= 1)
        (second_id,) = ctl.submit(second.model_dump_json(), {str(task_files["upper"]): task_files["upper"].read_bytes()})
        step = jobs()[first_id]["step"]
        wait(lambda: jobs()[first_id]["step"] >= step + 5)  # many ticks later
        now = jobs()
        assert now[first_id]["state"] == "running" and now[first_id]["replica"] == big.name
        assert now[second_id]["state"] == "queued", now[second_id]["error"]
        wait(lambda: all(j["state"] in TERMINAL for j in jobs().values()), timeout=300)
        now = jobs()
        assert now[first_id]["state"] == now[second_id]["state"] == "done", (now, list(ctl.events))
        assert any(f"placed {second_id} on {big.name}" in e for e in ctl.events)
        assert not any(f"placed {second_id} on {small.name}" in e for e in ctl.events)
    finally:
        ctl.shutdown()
        ctl.registry.close()
