"""Nodes joining and leaving (ray.cluster_utils.Cluster): queued jobs wait for capacity, a replica
starts on each new node, and a removed node's job resumes elsewhere, ending as if never moved."""

import time

import pytest
import ray
from conftest import run_config
from ray.cluster_utils import Cluster
from test_cluster import adapter_weights, assert_same_adapter, straight_adapter, submit, wait_for

from rayft.cluster.controller import get_controller
from rayft.config import ClusterConfig


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs the controller only
    ray.init(address=c.address, namespace="rayft", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_nodes_join_and_leave_and_the_job_survives(cluster, tiny_model_dir, task_files, tmp_path):
    # still running when the first node goes (about 35 steps pass from step 3 to the removal)
    jobs = {"upper": {"steps": 150, "checkpoint_every": 5}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    # a URI root: checkpoints go through pyarrow's filesystem, as they would to s3:// or gs://
    ctl = get_controller(ClusterConfig(storage=f"file://{tmp_path}/store", poll_s=0.05))
    (job_id,) = submit(ctl, cfg, [task_files["upper"]])
    time.sleep(2)
    jobs_now, st = wait_for(ctl, lambda j, st: True)
    assert jobs_now[job_id]["state"] == "queued" and st["replicas"] == [], "no CPU anywhere: it waits"

    first = cluster.add_node(num_cpus=1)
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["step"] >= 3)
    on_first = jobs_now[job_id]["replica"]
    assert [r["node"] for r in st["replicas"]] == [first.node_id]

    second = cluster.add_node(num_cpus=1)
    jobs_now, _ = wait_for(ctl, lambda j, st: any(r["node"] == second.node_id and r["ready"] for r in st["replicas"]))
    cluster.remove_node(first)
    assert jobs_now[job_id]["state"] == "running" and jobs_now[job_id]["replica"] == on_first
    jobs_now, st = wait_for(ctl, lambda j, _: j[job_id]["state"] == "done")
    assert jobs_now[job_id]["replica"] != on_first
    assert any(f"replica {on_first} lost" in e and job_id in e for e in st["events"]), "requeued, not finished first"
    assert [r["node"] for r in st["replicas"]] == [second.node_id]
    assert (tmp_path / "store" / "registry.sqlite").is_file(), "the registry is pushed to the URI root"
    adapter = tmp_path / "store" / "jobs" / job_id / "adapters" / job_id
    assert jobs_now[job_id]["adapter_path"] == f"file://{tmp_path}/store/jobs/{job_id}/adapters/{job_id}"
    assert_same_adapter(adapter_weights(adapter),
                        straight_adapter(tiny_model_dir, task_files, jobs, "upper", tmp_path), tol=1e-6)
    ray.get(ctl.shutdown.remote())
    ray.kill(ctl, no_restart=True)
