"""Staged replicas under the controller, on a multi-node ray.cluster_utils.Cluster: each node's
replica is a group of stage actors; a removed node takes its whole group down, and its job resumes
from its checkpoint on another node's group, ending as if never moved; the bubble gauge is exported."""

import re
import time
import urllib.request

import pytest
import ray
from conftest import run_config
from ray.cluster_utils import Cluster
from test_cluster import adapter_weights, assert_same_adapter, straight_adapter, submit, wait_for

from rayft.cluster.controller import get_controller
from rayft.config import ClusterConfig


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {"metrics_report_interval_ms": 500}})
    ray.init(address=c.address, namespace="rayft", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def assert_ends_as_if_never_moved(ctl, job_id, tiny_model_dir, task_files, jobs, name, tmp_path):
    """The job's published adapter equals an uninterrupted run alone; then the controller stops."""
    assert_same_adapter(adapter_weights(tmp_path / "store" / "jobs" / job_id / "adapters" / job_id),
                        straight_adapter(tiny_model_dir, task_files, jobs, name, tmp_path), tol=1e-4)
    ray.get(ctl.shutdown.remote())
    ray.kill(ctl, no_restart=True)


def test_a_removed_nodes_staged_replica_goes_down_whole_and_its_job_resumes_on_another(
        cluster, tiny_model_dir, task_files, tmp_path):
    first = cluster.add_node(num_cpus=1)
    # enough steps to still be running when the node goes (about 40 steps pass from step 5 to the
    # removal: the metrics scrape and the second node's replica coming up), few enough not to waste time
    jobs = {"upper": {"steps": 120, "checkpoint_every": 4, "adapter": {"dropout": 0.1},
                      "optimizer": {"max_grad_norm": 0.3, "grad_accumulation": 2}}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    ctl = get_controller(ClusterConfig(storage=str(tmp_path / "store"), poll_s=0.05, replica={"stages": 2}))
    (job_id,) = submit(ctl, cfg, [task_files["upper"]])
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["step"] >= 5)
    on_first = jobs_now[job_id]["replica"]
    assert [r["node"] for r in st["replicas"]] == [first.node_id]
    # its two stage actors and its placement group live on that node
    layout = ray.get(ray.get_actor(on_first, namespace="rayft").layout.remote())
    assert [s["node"] for s in layout["stages"]] == [first.node_id] * 2 and layout["strategy"] == "STRICT_PACK"
    assert [s["layers"] for s in layout["stages"]] == [[0, 2], [2, 4]]

    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]  # the controller's node exports it
    for _ in range(60):
        body = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics").read().decode() for p in ports)
        found = re.search(r'ray_rayft_replica_bubble_fraction\{[^}]*replica="' + on_first + r'"[^}]*\} ([0-9.e-]+)', body)
        if found:
            break
        time.sleep(0.5)
    assert found and 0.0 <= float(found.group(1)) < 1.0, "the bubble gauge reaches the node's Prometheus endpoint"

    second = cluster.add_node(num_cpus=1)
    jobs_now, _ = wait_for(ctl, lambda j, st: any(r["node"] == second.node_id and r["ready"] for r in st["replicas"]))
    cluster.remove_node(first)
    assert jobs_now[job_id]["state"] == "running" and jobs_now[job_id]["replica"] == on_first
    t0 = time.time()
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["state"] == "done", timeout=240)
    assert jobs_now[job_id]["replica"] != on_first
    # the controller (num_cpus=0, so on any node) either saw the replica go, or died with the node and,
    # restarted elsewhere, found its replica gone
    assert any((f"replica {on_first} lost" in e or f"requeued {job_id}: its replica is gone" in e) and job_id in e
               for e in st["events"]), st["events"]
    assert on_first not in {r["name"] for r in st["replicas"]}
    assert time.time() - t0 < 240
    assert_ends_as_if_never_moved(ctl, job_id, tiny_model_dir, task_files, jobs, "upper", tmp_path)


def test_a_killed_stage_takes_its_group_down_and_the_job_resumes_on_the_rebuilt_group(
        cluster, tiny_model_dir, task_files, tmp_path):
    import os
    import signal

    node = cluster.add_node(num_cpus=1)
    # the stage is killed right after step 4 and no step passes until the group is rebuilt: the job
    # needs only a margin of steps to be still running then, and some after its resume
    jobs = {"reverse": {"steps": 40, "checkpoint_every": 3, "adapter": {"variant": "dora", "dropout": 0.1}}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    ctl = get_controller(ClusterConfig(storage=str(tmp_path / "store"), poll_s=0.05, replica={"stages": 2}))
    (job_id,) = submit(ctl, cfg, [task_files["reverse"]])
    jobs_now, _ = wait_for(ctl, lambda j, _: j[job_id]["step"] >= 4)
    group = jobs_now[job_id]["replica"]
    pids = ray.get(ray.get_actor(group, namespace="rayft").stage_pids.remote())
    os.kill(pids[0], signal.SIGKILL)  # one stage crashes; the other is left waiting on it
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["state"] == "done", timeout=240)
    assert any(f"replica {group} lost" in e and job_id in e for e in st["events"]), st["events"]
    assert [r["node"] for r in st["replicas"]] == [node.node_id], "the group is rebuilt on its node"
    for pid in pids:  # no stage of the old group outlives it
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, pid
    assert_ends_as_if_never_moved(ctl, job_id, tiny_model_dir, task_files, jobs, "reverse", tmp_path)


def test_auto_stages_turn_idle_replicas_of_two_nodes_into_a_staged_one_and_back(
        cluster, tiny_model_dir, task_files, tmp_path):
    """Two one-device nodes, a job that needs two stages: the two nodes' idle replicas become one
    replica with a stage on each (activations cross nodes), the job ends as if trained alone, and
    the idle staged replica gives its devices back to one-stage replicas."""
    import json

    from rayft.model.shape import model_shape
    from rayft.scheduler.memory import GIB, estimate, load_coefficients
    from rayft.scheduler.plan import job_shapes
    from rayft.scheduler.stages import stage_estimates

    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    jobs = {"upper": {"steps": 40, "checkpoint_every": 8, "tokens_per_micro_batch": 256}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    # no workspace term, so the tiny model's estimate is its weights and activations alone
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"coefficients": {"token": 17.0, "attn": 1.0, "logit": 8.0, "workspace": 0.0}}))
    coef = load_coefficients(fit)
    model, shapes = model_shape(cfg.base_model), job_shapes(cfg)
    one = estimate(model, shapes, coef).total
    two = max(e.total for e in stage_estimates(model, shapes, 2, coef))
    assert two < one
    ctl = get_controller(ClusterConfig(storage=str(tmp_path / "store"), poll_s=0.05, replica={"stages": "auto"},
                                       cpu_replicas_per_node=1, memory_coefficients=fit,
                                       cpu_replica_memory_gib=(one + two) / 2 / 0.9 / GIB))
    ids = sorted(n.node_id for n in nodes)

    def one_stage_on_both(st):
        return (sorted(r["node"] for r in st["replicas"]) == ids
                and all(r["ready"] and r["stages"] == 1 for r in st["replicas"]))

    wait_for(ctl, lambda j, st: one_stage_on_both(st))
    (job_id,) = submit(ctl, cfg, [task_files["upper"]])
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["step"] >= 1, timeout=240)
    assert any(f"{job_id} needs 2 pipeline stages" in e for e in st["events"]), st["events"]
    (staged,) = st["replicas"]
    assert sorted(staged["nodes"]) == ids and jobs_now[job_id]["replica"] == staged["name"]
    layout = ray.get(ray.get_actor(staged["name"], namespace="rayft").layout.remote())
    assert sorted(s["node"] for s in layout["stages"]) == ids and layout["strategy"] == "PACK"
    jobs_now, st = wait_for(ctl, lambda j, st: j[job_id]["state"] == "done" and one_stage_on_both(st), timeout=240)
    assert any(f"replica {staged['name']} (2 stages) idle" in e for e in st["events"]), st["events"]
    assert_ends_as_if_never_moved(ctl, job_id, tiny_model_dir, task_files, jobs, "upper", tmp_path)
