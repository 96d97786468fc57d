"""`rayft submit/jobs/status/cancel` and `ray job submit -- python jobs/train.py` against a real
`ray start --head` with token authentication on (KubeRay's authOptions; Ray's default for new clusters from 2.61)."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_serving_engine import store  # noqa: F401  (a store with adapters a, b, c)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    port, dash = free_port(), free_port()
    # PYTHONPATH: the repository importable on the cluster (serve.app), as k8s/Dockerfile sets it
    # the cluster's own token, so the test needs no ~/.ray/auth_token (`ray start` will not make one)
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(port), "--dashboard-port", str(dash),
                    "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", str(tmp / "ray")],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "dashboard": f"http://127.0.0.1:{dash}",
               "ray": ray_bin, "storage": tmp / "store"}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def rayft(head, *args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "rayft.cli", *args], env=head["env"], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def configs(tmp_path, tiny_model_dir, task_files):
    def write(name, jobs, **datasets):
        cfg = {
            "base_model": {"path": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            "adapters": [{"name": j, "r": 4} for j in jobs],
            "datasets": [{"name": j, "path": str(datasets.get(j, task_files.get(j)))} for j in jobs],
            "jobs": [{"adapter": j, "dataset": j, "tokens_per_micro_batch": 128, "max_seq_len": 64, **over}
                     for j, over in jobs.items()],
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


def test_submit_jobs_status_and_cancel_from_the_command_line(head, configs):
    ok = configs("ok", {"upper": {"steps": 5}})
    code, out = rayft(head, "submit", str(ok), "--storage", str(head["storage"]), "--wait")
    assert code == 0, out
    job_id = out.split("submitted ")[1].split()[0]
    assert f"job {job_id} done: adapter at {head['storage']}/jobs/{job_id}/adapters/{job_id}" in out
    assert (head["storage"] / "jobs" / job_id / "adapters" / job_id / "adapter_model.safetensors").is_file()

    long = configs("long", {"reverse": {"steps": 100000}})
    code, out = rayft(head, "submit", str(long))  # the running controller, its storage
    assert code == 0, out
    long_id = out.split("submitted ")[1].split()[0]
    code, out = rayft(head, "jobs")
    assert code == 0 and job_id in out and long_id in out, out
    code, out = rayft(head, "status")
    assert code == 0 and "replicas" in out and "rayft-replica-" in out and "CPU" in out, out
    code, out = rayft(head, "priority", long_id, "4")
    assert code == 0 and f"{long_id}: priority 4" in out, out
    code, out = rayft(head, "priority", job_id, "4")
    assert code == 2 and f"job {job_id} is done: its priority can no longer change" in out, out
    # the dashboard: the controller's jobs on a page at 127.0.0.1
    port = free_port()
    page = subprocess.Popen([sys.executable, "-m", "rayft.cli", "dashboard", "--port", str(port)], env=head["env"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.time() + 90, None
        while time.time() < deadline and seen is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as r:
                    seen = {j["id"]: j["priority"] for j in json.loads(r.read())["jobs"]}
            except OSError:
                assert page.poll() is None, page.stdout.read()
                time.sleep(0.5)
        assert seen is not None and seen[long_id] == 4, seen
    finally:
        page.terminate()
        page.wait(timeout=30)
    code, out = rayft(head, "cancel", long_id)
    assert code == 0 and f"{long_id}: cancelled" in out, out
    code, out = rayft(head, "jobs", "--state", "cancelled")
    assert long_id in out and job_id not in out

    code, out = rayft(head, "cancel", "no-such-job")
    assert code == 2 and "no job with id 'no-such-job'" in out
    code, out = rayft(head, "submit", str(ok), "--storage", str(head["storage"].parent / "elsewhere"))
    assert code == 2 and f"the controller already runs with storage {head['storage']}" in out
    code, out = rayft(head, "submit", str(ok), "--stages", "auto")
    assert code == 2 and "the controller already runs with replica stages 1, not auto" in out
    code, out = rayft(head, "submit", str(ok), "--stages", "0")
    assert code == 2 and "'0': a stage count (1, 2, ...) or auto" in out
    bad = configs("bad", {"upper": {"steps": 0}})
    code, out = rayft(head, "submit", str(bad))
    assert code == 2 and "jobs.0.steps" in out and "bad.yaml" in out

    # stopped and started again on the same storage: the registry still knows every job
    code, out = rayft(head, "stop")
    assert code == 0, out
    code, out = rayft(head, "status")
    assert code == 2 and "no rayft controller on this cluster" in out
    code, out = rayft(head, "dashboard", "--port", str(free_port()))
    assert code == 2 and "no rayft controller on this cluster" in out
    code, out = rayft(head, "submit", str(configs("again", {"double": {"steps": 2}})), "--storage", str(head["storage"]), "--wait")
    assert code == 0, out
    code, out = rayft(head, "jobs")
    assert job_id in out and long_id in out, out


def test_ray_job_submit_streams_progress_and_fails_when_a_job_fails(head, configs, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = configs("mixed", {"double": {"steps": 80}, "broken": {"steps": 2}}, broken=broken)
    for _ in range(30):  # the head's job agent can take a while to come up after `ray start`
        r = subprocess.run(
            [head["ray"], "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO), "--",
             "python", "jobs/train.py", str(cfg)],
            env=head["env"], capture_output=True, text=True, timeout=400)
        out = r.stdout + r.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(2)
    assert r.returncode != 0, out
    assert "broken.jsonl: line 2: missing field 'output'" in out
    assert re.search(r"double-\w+: running step \d+/80", out), "progress lines stream into the job's log"
    assert re.search(r"double-\w+: done step 80/80", out)
    assert "done: adapter at" in out


def test_serve_deploy_puts_the_shipped_config_on_a_running_cluster(head, store, tmp_path):  # noqa: F811
    from test_serve_cli import SERVE_BIN, query, shipped_serve_config

    path, port = shipped_serve_config(store, tmp_path)
    r = subprocess.run([SERVE_BIN, "deploy", str(path), "--address", head["dashboard"]], env=head["env"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        ids, completion = query(port)
        assert {"a", "b", "c"} <= ids and completion["object"] == "text_completion"
    finally:
        subprocess.run([SERVE_BIN, "shutdown", "--address", head["dashboard"], "-y"], env=head["env"],
                       capture_output=True, timeout=120)


@pytest.mark.parametrize("mode", [None, "token"])
def test_a_refused_connection_says_what_token_authentication_needs(monkeypatch, mode):
    """Ray reports a cluster that refuses a client's (missing) token only as a failed connection."""
    import argparse

    import ray

    from rayft import cli

    def refuse(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6390")
    monkeypatch.setattr(ray, "init", refuse)
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with pytest.raises(cli._CliError) as e:
        cli._connect(argparse.Namespace(address="127.0.0.1:6390"))
    message = str(e.value)
    assert "cannot reach a Ray cluster at '127.0.0.1:6390'" in message
    assert ("set RAY_AUTH_MODE=token here too" in message) == (mode is None), message
    assert "RAY_AUTH_TOKEN" in message and "~/.ray/auth_token" in message
