"""Training and serving in one loop: a job that finishes on the cluster is served by name within
seconds, with no restart; retrained, the name answers with the new version."""

import time

import pytest
import ray
from conftest import free_port, run_config
from ray import serve
from test_cluster import submit, wait_for
from test_serve import call

from rayft.cluster.controller import get_controller
from rayft.config import BaseModelConfig, ClusterConfig, ServeConfig
from rayft.serving.server import build


@pytest.fixture
def loop(tmp_path, tiny_model_dir):
    port = free_port()
    ray.init(num_cpus=2, namespace="rayft", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    storage = tmp_path / "store"
    storage.mkdir()
    ctl = get_controller(ClusterConfig(storage=str(storage), poll_s=0.05))
    serve.run(build(ServeConfig(store=storage, base_model=BaseModelConfig(path=str(tiny_model_dir), device="cpu"))),
              name="rayft", route_prefix="/")
    yield ctl, f"http://127.0.0.1:{port}"
    ray.get(ctl.shutdown.remote())
    ray.kill(ctl, no_restart=True)
    serve.shutdown()
    ray.shutdown()


def complete(url, model):
    code, body = call(f"{url}/v1/completions", "POST", {"model": model, "prompt": "abc", "max_tokens": 6, "temperature": 0})
    assert code == 200, body
    return body["choices"][0]["text"]


def test_a_finished_job_is_served_by_name_without_a_restart(loop, tiny_model_dir, task_files):
    ctl, url = loop
    assert [m["id"] for m in call(f"{url}/v1/models")[1]["data"]] == [tiny_model_dir.name]
    first = run_config(tiny_model_dir, task_files, {"upper": {"steps": 5, "optimizer": {"lr": 0.05}}})
    (job1,) = submit(ctl, first, [task_files["upper"]])
    wait_for(ctl, lambda j, _: j[job1]["state"] == "done")
    t0 = time.time()
    while "upper" not in {m["id"] for m in call(f"{url}/v1/models")[1]["data"]}:
        assert time.time() - t0 < 10, "the finished adapter did not appear"
        time.sleep(0.2)
    ids = {m["id"]: m for m in call(f"{url}/v1/models")[1]["data"]}
    assert job1 in ids and ids["upper"]["parent"] == tiny_model_dir.name
    v1 = complete(url, "upper")
    assert v1 == complete(url, job1) and v1 != complete(url, tiny_model_dir.name)

    # retrained under the same adapter name: the name now answers with the new version
    second = run_config(tiny_model_dir, task_files, {"upper": {"steps": 5, "seed": 1, "optimizer": {"lr": 0.05}}})
    (job2,) = submit(ctl, second, [task_files["upper"]])
    wait_for(ctl, lambda j, _: j[job2]["state"] == "done")
    v2 = complete(url, job2)
    assert v2 != v1
    assert complete(url, "upper") == v2 and complete(url, job1) == v1, "both versions stay servable by id"
