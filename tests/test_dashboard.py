"""The dashboard: its JSON API and guards over real HTTP (a stand-in source, no Ray), and the page
in headless Chromium against a live local cluster: curves grow while jobs train, a job is
cancelled from the page and its state changes, a priority is set, the playground completes with a
served adapter, and a failed job's error (user input, HTML in it) shows as text."""

import json
import math
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from rayft.dashboard.app import allowed_hosts, build_app
from rayft.dashboard.source import SourceError

STATIC = Path(__file__).resolve().parents[1] / "rayft" / "dashboard" / "static"


class FakeSource:
    """Jobs and metrics as the controller gives them; records the actions it is asked for."""

    def __init__(self):
        self.actions = []
        self.jobs = [{"id": "a-1", "name": "a", "adapter": "a", "state": "running", "priority": 0, "step": 3,
                      "total_steps": 10, "replica": "rayft-replica-0", "error": None, "loss": float("nan"),
                      "tokens_per_s": 100.0, "adapter_path": None},
                     {"id": "b-2", "name": "b", "adapter": "b", "state": "failed", "priority": 0, "step": 0,
                      "total_steps": None, "replica": None, "error": "<script>alert(1)</script>", "loss": None,
                      "tokens_per_s": None, "adapter_path": None}]

    def status(self):
        return {"jobs": self.jobs, "replicas": [], "events": ["12:00:00 submitted a-1"], "storage": "/s"}

    def metrics(self, job_id, after):
        if job_id not in ("a-1", "b-2"):
            raise SourceError(f"no job with id {job_id!r}")
        rows = [[1, 2.0, 90.0, 0.1, None], [2, float("inf"), 95.0, 0.1, None], [3, 1.5, 99.0, 0.0, 1.7]]
        return [r for r in rows if r[0] > after]

    def cancel(self, job_id):
        self.actions.append(("cancel", job_id))
        return "cancelled"

    def set_priority(self, job_id, priority):
        if job_id == "b-2":
            raise SourceError("job b-2 is failed: its priority can no longer change")
        self.actions.append(("priority", job_id, priority))
        return priority


class Server:
    """A uvicorn server on a thread, on 127.0.0.1."""

    def __init__(self, app, port):
        import uvicorn

        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the dashboard did not start"
            time.sleep(0.05)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def call(url, method="GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, code, got = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, code, got = e.read(), e.code, e.headers
    try:
        return code, json.loads(raw), got
    except ValueError:
        return code, raw.decode(), got


@pytest.fixture(scope="module")
def fake():
    source = FakeSource()
    port = free_port()
    server = Server(build_app(source, hosts=allowed_hosts("127.0.0.1", port)), port)
    yield server, source
    server.stop()


def test_the_page_and_its_files_come_with_headers_that_forbid_framing_and_inline_script(fake):
    server, _ = fake
    code, html, headers = call(f"{server.url}/")
    assert code == 200 and "<table id=\"jobs\">" in html and "cdn" not in html.lower()
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("dashboard.js", "dashboard.css"):
        code, body, headers = call(f"{server.url}/static/{name}")
        assert code == 200 and len(body) > 1000 and headers["X-Content-Type-Options"] == "nosniff"
    assert call(f"{server.url}/static/..%2Fapp.py")[0] == 404
    assert call(f"{server.url}/static/app.py")[0] == 404


def test_state_and_metrics_are_json_with_non_finite_values_as_null(fake):
    server, _ = fake
    code, st, _ = call(f"{server.url}/api/state")
    assert code == 200 and st["jobs"][0]["loss"] is None and st["jobs"][1]["error"] == "<script>alert(1)</script>"
    code, m, _ = call(f"{server.url}/api/jobs/a-1/metrics?after=1")
    assert code == 200 and m["rows"] == [[2, None, 95.0, 0.1, None], [3, 1.5, 99.0, 0.0, 1.7]]
    code, body, _ = call(f"{server.url}/api/jobs/nope/metrics")
    assert code == 400 and body["error"] == "no job with id 'nope'"
    assert call(f"{server.url}/api/jobs/a-1/metrics?after=x")[0] == 400


def test_actions_need_the_page_s_own_origin_and_valid_bodies(fake):
    server, source = fake
    same = {"Origin": server.url}
    for headers, why in [({}, "no Origin header"), ({"Origin": "http://evil.example"}, "'http://evil.example'"),
                         ({"Origin": f"http://localhost:{server.port}"}, "localhost")]:
        code, body, _ = call(f"{server.url}/api/jobs/a-1/cancel", "POST", {}, headers)
        assert code == 403 and "cross-origin action refused" in body["error"] and why in body["error"], body
    assert source.actions == []
    code, body, _ = call(f"{server.url}/api/jobs/a-1/cancel", "POST", {}, same)
    assert code == 200 and body == {"job": "a-1", "state": "cancelled"} and source.actions == [("cancel", "a-1")]
    for bad, field in [({"priority": "5"}, "priority"), ({"priority": 1.5}, "priority"), ({}, "priority"),
                       ({"priority": 1, "x": 2}, "x")]:
        code, body, _ = call(f"{server.url}/api/jobs/a-1/priority", "POST", bad, same)
        assert code == 400 and body["error"].startswith(field), (bad, body)
    code, body, _ = call(f"{server.url}/api/jobs/a-1/priority", "POST", {"priority": 7}, same)
    assert code == 200 and body["priority"] == 7 and source.actions[-1] == ("priority", "a-1", 7)
    code, body, _ = call(f"{server.url}/api/jobs/b-2/priority", "POST", {"priority": 7}, same)
    assert code == 400 and body["error"] == "job b-2 is failed: its priority can no longer change"
    code, body, _ = call(f"{server.url}/api/serve/completions", "POST", {"model": "a", "prompt": "x"}, same)
    assert code == 404 and "no Serve app" in body["error"]


def test_a_host_it_does_not_answer_to_is_refused_even_for_reading(fake):
    server, _ = fake
    for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1:{server.port + 1}"):
        code, body, _ = call(f"{server.url}/api/state", headers={"Host": host})
        assert code == 403 and "not one this dashboard answers to" in body["error"], host
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert call(f"{server.url}/api/state", headers={"Host": host})[0] == 200
    assert allowed_hosts("0.0.0.0", 8266, ["box", "box.lan:9000"]) == {
        "127.0.0.1:8266", "localhost:8266", "[::1]:8266", "box:8266", "box.lan:9000"}


def test_the_page_never_writes_html_from_data():
    js = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and " on" not in html.replace("<option", "")  # no inline script or handlers


# ---- the page in a real browser, against a live cluster ---------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_until(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_page_in_chromium_against_a_live_cluster(browser, tiny_model_dir, task_files, tmp_path):
    import ray
    from conftest import run_config
    from ray import serve
    from selenium.webdriver.common.by import By

    from rayft.cluster.controller import get_controller
    from rayft.config import BaseModelConfig, ClusterConfig, ServeConfig
    from rayft.model.shape import model_shape
    from rayft.scheduler.memory import GIB, estimate
    from rayft.scheduler.plan import job_shapes
    from rayft.serving.server import build

    # a dataset whose file name carries HTML, and a broken line: its job fails with an error naming it
    hostile = tmp_path / "<img src=x onerror=alert(1)>.jsonl"
    hostile.write_text(task_files["upper"].read_text().splitlines()[0] + "\n{broken\n")
    small = {"tokens_per_micro_batch": 64, "max_seq_len": 32}
    cfg = run_config(tiny_model_dir, task_files, {
        "long": {"task": "reverse", "steps": 3000, "priority": 1, "dataset": {"eval_split": 0.1}, **small},
        "short": {"task": "upper", "steps": 3, **small},
        "waits": {"task": "double", "steps": 3000, "tokens_per_micro_batch": 1024, "max_seq_len": 64},
        "broken": {"task": "upper", "dataset": {"path": str(hostile)}, **small},
    }, eval={"loss_every": 5, "max_examples": 4})
    # one replica whose budget holds long, short and broken together, or waits alone, not long and waits
    model = model_shape(cfg.base_model)
    shapes = job_shapes(cfg)
    need = {k: estimate(model, {n: shapes[n] for n in k.split("+")}).total
            for k in ("long+short+broken", "waits", "long+waits")}
    assert need["long+short+broken"] < need["waits"] < need["long+waits"], need
    budget_gib = (need["waits"] + need["long+waits"]) / 2 / 0.9 / GIB
    storage = tmp_path / "storage"
    ray.init(address="local", num_cpus=2, namespace="rayft", include_dashboard=True, log_to_driver=False)
    serve_port, dash = free_port(), None
    try:
        ctl = get_controller(ClusterConfig(storage=str(storage), poll_s=0.05, cpu_replicas_per_node=1,
                                           cpu_replica_memory_gib=budget_gib))
        files = {str(p): Path(p).read_bytes() for p in {task_files["reverse"], task_files["upper"],
                                                         task_files["double"], hostile}}
        ids = dict(zip(("long", "short", "waits", "broken"), ray.get(ctl.submit.remote(cfg.model_dump_json(), files))))
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        serve.run(build(ServeConfig(store=storage, base_model=BaseModelConfig(path=str(tiny_model_dir), device="cpu"))),
                  name="rayft", route_prefix="/")
        port = free_port()
        dash = Server(build_app(serve_url=f"http://127.0.0.1:{serve_port}", hosts=allowed_hosts("127.0.0.1", port)),
                      port)
        browser.get(f"{dash.url}/?refresh=500")

        def row(job):
            return browser.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job="{ids[job]}"]')

        def read(script, *args):  # in one call: the page redraws between two of selenium's
            return browser.execute_script(script, *args)

        def state(job):
            return read("const r = [...document.querySelectorAll('#jobs tbody tr')]"
                        ".find((r) => r.dataset.job === arguments[0]);"
                        "return r ? r.querySelector('td.state').textContent : null;", ids[job])

        def points(job, metric="loss"):
            return read("const p = [...document.querySelectorAll(`#chart-${arguments[1]} path`)]"
                        ".find((p) => p.dataset.job === arguments[0]);"
                        "return p ? Number(p.dataset.points) : 0;", ids[job], metric)

        wait_until(lambda: state("short") == "done" and state("broken") == "failed", what="short done, broken failed")
        first = wait_until(lambda: points("long"), what="the long job's loss curve")
        wait_until(lambda: points("long") > first + 3, what="the curve to grow")
        assert points("short") == 3  # a finished job's whole curve
        assert points("long", "tokens_per_s") > 0 and points("long", "padding") > 0
        wait_until(lambda: points("long", "eval_loss") >= 2, what="held-out loss points (every 5 steps)")
        # the failed job's error, HTML in it, is shown as text: no element made of it, no script run
        error = read("return [...document.querySelectorAll('#jobs tbody tr')].find((r) => r.dataset.job === "
                     "arguments[0]).querySelector('td.detail').textContent;", ids["broken"])
        assert "<img src=x onerror=alert(1)>" in error and "line 2" in error, error
        assert browser.find_elements(By.CSS_SELECTOR, "#jobs img, #events img") == []
        # one replica: "waits" is queued behind "long"; raised above it from the page, it preempts it
        assert state("waits") == "queued"
        priority = row("waits").find_element(By.CSS_SELECTOR, ".priority input")
        priority.clear()
        priority.send_keys("5")
        row("waits").find_element(By.CSS_SELECTOR, "button.set-priority").click()
        wait_until(lambda: browser.find_element(By.ID, "message").text == f"{ids['waits']}: priority 5",
                   what="the priority's confirmation")
        wait_until(lambda: state("waits") == "running", what="the raised job to run")
        assert {j["id"]: j["priority"] for j in ray.get(ctl.list_jobs.remote())}[ids["waits"]] == 5
        # cancel from the page: a first click asks, the second cancels
        cancel = row("waits").find_element(By.CSS_SELECTOR, "button.cancel")
        cancel.click()
        assert cancel.text == "confirm cancel" and state("waits") == "running"
        cancel.click()
        wait_until(lambda: state("waits") == "cancelled", what="the cancelled state")
        assert {j["id"]: j["state"] for j in ray.get(ctl.list_jobs.remote())}[ids["waits"]] == "cancelled"
        # the controller's own errors, as the CLI shows them
        same = {"Origin": dash.url}
        code, body, _ = call(f"{dash.url}/api/jobs/{ids['short']}/priority", "POST", {"priority": 2}, same)
        assert code == 400 and body["error"] == f"job {ids['short']} is done: its priority can no longer change"
        code, body, _ = call(f"{dash.url}/api/jobs/no-such-job/cancel", "POST", {}, same)
        assert code == 400 and body["error"] == "no job with id 'no-such-job'", body
        # the playground: the finished job's adapter, served, completes as the API does
        wait_until(lambda: ids["short"] in [o.get_attribute("value") for o in
                                            browser.find_elements(By.CSS_SELECTOR, "#playground-model option")]
                   or browser.refresh() or False, timeout=60, what="the served adapter in the playground")
        browser.find_element(By.CSS_SELECTOR, f'#playground-model option[value="{ids["short"]}"]').click()
        browser.find_element(By.ID, "playground-prompt").send_keys("upper hello")
        browser.find_element(By.ID, "playground-tokens").clear()
        browser.find_element(By.ID, "playground-tokens").send_keys("6")
        browser.find_element(By.ID, "playground-run").click()
        out = wait_until(lambda: browser.find_element(By.ID, "playground-output").get_attribute("data-done")
                         and browser.find_element(By.ID, "playground-output").text, what="the completion")
        direct = call(f"http://127.0.0.1:{serve_port}/v1/completions", "POST",
                      {"model": ids["short"], "prompt": "upper hello", "max_tokens": 6, "temperature": 0})[1]
        assert out == direct["choices"][0]["text"].strip() or out == direct["choices"][0]["text"], (out, direct)
        if os.environ.get("RAYFT_SCREENSHOT"):  # the README's picture
            browser.save_screenshot(os.environ["RAYFT_SCREENSHOT"])
        # the same page, mounted in the Serve app on the storage root; its actions guarded there too
        code, st, _ = call(f"http://127.0.0.1:{serve_port}/dashboard/api/state")
        assert code == 200 and {j["id"] for j in st["jobs"]} == set(ids.values())
        code, body, _ = call(f"http://127.0.0.1:{serve_port}/dashboard/api/jobs/{ids['long']}/cancel", "POST", {},
                             {"Origin": "http://evil.example"})
        assert code == 403, body
        assert call(f"http://127.0.0.1:{serve_port}/dashboard/")[0] == 200
        assert not math.isnan(float(st["jobs"][0]["step"]))
        # Ray's head provisions Grafana from its dashboards folder: `rayft grafana` puts rayft's there
        from rayft.cli import main
        from rayft.dashboard.grafana import FILE

        session = Path(ray._private.worker._global_node.get_session_dir_path())  # this test's (others may run)
        provisioning = session / "metrics" / "grafana" / "provisioning" / "dashboards" / "default.yml"
        folder = Path(wait_until(lambda: provisioning.is_file() and provisioning.read_text(), 60, "Ray's Grafana files")
                      .split("path:")[1].split()[0])
        assert folder.is_dir() and any(folder.glob("default_grafana_dashboard.json"))  # Ray's own, beside ours
        assert main(["grafana", "--output", str(folder)]) == 0
        assert json.loads((folder / FILE).read_text())["uid"] == "rayft"
    finally:
        if dash is not None:
            dash.stop()
        serve.shutdown()
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["namespace"] == "rayft":
                try:
                    ray.kill(ray.get_actor(a["name"], namespace="rayft"), no_restart=True)
                except ValueError:
                    pass
        ray.shutdown()


# ---- Grafana ---------------------------------------------------------------------------------------

def test_the_grafana_dashboard_queries_only_gauges_the_controller_exports(tmp_path, capsys):
    import re

    from rayft.cli import main
    from rayft.cluster.controller import GAUGES
    from rayft.dashboard.grafana import FILE, dashboard_json, ray_dashboards_dir

    dash = json.loads(dashboard_json())
    exported = {f"ray_{name}" for name, _, _ in GAUGES.values()}
    variables = {v["name"] for v in dash["templating"]["list"]}
    queried = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_rayft_\w+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            queried |= names
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables, panel["title"]
            labels = set(re.findall(r"by \(([^)]*)\)", target["expr"])[0].replace(" ", "").split(","))
            tags = {t for _, _, ts in GAUGES.values() for t in ts}
            assert labels <= tags, (panel["title"], labels - tags)
    assert queried == exported  # every gauge has its panel
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "rayft"
    # written where Ray's provisioning loads dashboards, or anywhere asked
    ray_tmp = tmp_path / "ray"
    assert main(["grafana", "--ray-temp-dir", str(ray_tmp)]) == 2
    assert "no Ray session's Grafana folder" in capsys.readouterr().out
    ray_dashboards_dir(ray_tmp).mkdir(parents=True)
    assert main(["grafana", "--ray-temp-dir", str(ray_tmp)]) == 0
    assert json.loads((ray_dashboards_dir(ray_tmp) / FILE).read_text()) == dash
    assert main(["grafana", "--output", str(tmp_path / "out" / "d.json")]) == 0
    assert json.loads((tmp_path / "out" / "d.json").read_text()) == dash
