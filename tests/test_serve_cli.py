"""Starting the server the three ways a user does: `rayft serve --store`, `rayft serve --config`
and Ray's own `serve run configs/serve.yaml`; each answers over HTTP, then stops on Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import free_port
from test_serving_engine import store  # noqa: F401

from rayft.cli import main

REPO = Path(__file__).resolve().parent.parent


SERVE_BIN = shutil.which("serve") or str(Path(sys.executable).parent / "serve")


def shipped_serve_config(root, tmp_path) -> tuple[Path, int]:
    """configs/serve.yaml pointed at the store `root`, on a free port."""
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    port = free_port()
    cfg["applications"][0]["args"]["store"] = str(root)
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port


def query(port, alive=lambda: None) -> tuple[set, dict]:
    """Wait for the server to answer /v1/models (`alive` raises if it died), then one completion."""
    deadline = time.time() + 180
    while time.time() < deadline:
        alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                models = json.loads(r.read())
            break
        except OSError:
            time.sleep(0.25)
    else:
        raise AssertionError("the server did not come up")
    body = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 3, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        completion = json.loads(r.read())
    return {m["id"] for m in models["data"]}, completion


def _serve_and_query(cmd, port, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray each time
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def alive():
        assert proc.poll() is None, proc.stdout.read()

    try:
        return query(port, alive)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_rayft_serve_with_a_store(store, tiny_model_dir):  # noqa: F811
    port = free_port()
    ids, completion = _serve_and_query(
        [sys.executable, "-m", "rayft.cli", "serve", "--store", str(store), "--port", str(port)], port)
    assert {"a", "b", "c", tiny_model_dir.name} <= ids
    assert completion["choices"][0]["finish_reason"] in ("length", "stop")


def test_serve_run_with_the_shipped_config(store, tmp_path):  # noqa: F811
    path, port = shipped_serve_config(store, tmp_path)
    ids, completion = _serve_and_query([SERVE_BIN, "run", str(path)], port)
    assert {"a", "b", "c"} <= ids and completion["object"] == "text_completion"


def test_serve_config_errors_name_the_line(tmp_path, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: rayft\n    args:\n      store: /x\n      max_adapters: 0\n")
    assert main(["serve", "--config", str(bad)]) == 2
    out = capsys.readouterr().out
    assert f"{bad}:5: applications.0.args.max_adapters" in out
    assert main(["serve", "--store", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().out
