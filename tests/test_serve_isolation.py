"""Isolation over real HTTP, with a Serve app: a long stream runs unchanged while bad requests, a
failed hot reload, a refused DELETE and a retrain come in; a client that goes away stops its
generation."""

import http.client
import json
import random
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from conftest import free_port
from ray import serve
from safetensors.torch import load_file, save_file
from test_serve import call
from test_serving_engine import store  # noqa: F401  (the store fixture: adapters a, b, c)
from test_serving_isolation import replace_dir
from test_stop_strings import reference_cut

from rayft.config import ServeConfig
from rayft.serving.server import build

LONG = 700  # tokens: a generation that runs for seconds on the tiny model


@pytest.fixture(scope="module")
def server(store):  # noqa: F811
    nan = store / "adapters" / "nanad"  # an adapter that diverged: every weight NaN
    nan.mkdir()
    shutil.copy(store / "adapters" / "a" / "adapter_config.json", nan)
    weights = load_file(str(store / "adapters" / "a" / "adapter_model.safetensors"))
    save_file({k: v.clone().fill_(float("nan")) for k, v in weights.items()}, str(nan / "adapter_model.safetensors"))
    broken = store / "adapters" / "broken"
    broken.mkdir()
    shutil.copy(store / "adapters" / "a" / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")

    port = free_port()
    # a cluster of its own, even while another test process has one running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(ServeConfig(store=store, max_adapters=4, max_tokens_limit=LONG)), name="rayft", route_prefix="/")
    yield port
    serve.shutdown()
    ray.shutdown()


PROMPTS = ["x", "hello there", "abc", "zzz", "lorem ipsum", "the quick brown fox", "long story", "once upon a time"]


@pytest.fixture(scope="module")
def long_prompts(server, tiny_model_dir) -> dict[str, str]:
    """For each model that has one, a prompt whose greedy generation runs all LONG tokens (the
    random tiny model ends most generations early with its end-of-sequence token)."""
    pairs = [(m, p) for m in ("a", "b", "c", tiny_model_dir.name) for p in PROMPTS]
    with ThreadPoolExecutor(len(pairs)) as pool:  # one batch
        results = list(pool.map(lambda mp: complete(server, model=mp[0], prompt=mp[1], max_tokens=LONG), pairs))
    found: dict[str, str] = {}
    for (model, prompt), (code, body) in zip(pairs, results):
        assert code == 200, body
        if body["choices"][0]["finish_reason"] == "length":
            found.setdefault(model, prompt)
    assert set(found) & {"a", "b", "c"}, f"no adapter generates {LONG} tokens for any of {PROMPTS}"
    return found


def two_adapters(port, long_prompts) -> tuple[str, str, str]:
    """An adapter with a long prompt, another one that answers differently, and the prompt."""
    first = next(m for m in ("a", "b", "c") if m in long_prompts)
    other = next(m for m in ("a", "b", "c") if m != first
                 and text_of(port, model=m, max_tokens=10) != text_of(port, model=first, max_tokens=10))
    return first, other, long_prompts[first]


def url(port) -> str:
    return f"http://127.0.0.1:{port}"


def stats() -> dict:
    return serve.get_deployment_handle("AdapterServer", app_name="rayft").engine_stats.remote().result()


def complete(port, **body) -> tuple[int, dict]:
    return call(f"{url(port)}/v1/completions", "POST", {"prompt": "once upon a time", "temperature": 0, **body})


def text_of(port, **body) -> str:
    code, out = complete(port, **body)
    assert code == 200, out
    return out["choices"][0]["text"]


def stream(port, events: list | None = None, **body) -> tuple[str, str]:
    """A streamed completion to its end: (text, finish_reason); each chunk's text goes to `events`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "once upon a time", "temperature": 0,
                                                        "stream": True, **body}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    text, finish = "", None
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            if events is not None:
                events.append(choice["text"])
    conn.close()
    return text, finish


class Background(threading.Thread):
    """A streamed completion in a thread; `events` fill as its chunks arrive."""

    def __init__(self, port, **body):
        super().__init__(daemon=True)
        self.port, self.body, self.events, self.result, self.error = port, body, [], None, None

    def run(self):
        try:
            self.result = stream(self.port, self.events, **self.body)
        except Exception as e:  # reported by the test
            self.error = e

    def wait_started(self, chunks: int = 5) -> None:
        deadline = time.time() + 60
        while len(self.events) < chunks:
            assert time.time() < deadline and self.is_alive(), "the stream did not start"
            time.sleep(0.01)

    def finish(self) -> tuple[str, str]:
        self.join(180)
        assert self.error is None and self.result is not None, self.error
        return self.result


def test_a_long_stream_is_unchanged_while_breaking_requests_come(server, long_prompts):
    port = server
    model, prompt = next(iter(long_prompts.items()))
    want = stream(port, model=model, prompt=prompt, max_tokens=LONG)
    long = Background(port, model=model, prompt=prompt, max_tokens=LONG)
    long.start()
    long.wait_started()
    for temperature in (1.0, 0):  # sampled and greedy: the NaN adapter's rows alone fail
        code, body = complete(port, model="nanad", max_tokens=8, temperature=temperature)
        assert code == 500 and "not finite" in body["error"]["message"], body
    code, body = complete(port, model="b", max_tokens=8, temperature=1.0, seed=2**64 + 5)
    assert code in (200, 400), body  # served (any int seed works in the engine) or refused by the API
    if code == 400:
        assert body["error"]["param"] == "seed"
    assert text_of(port, model="b", max_tokens=8, temperature=1e-45) == text_of(port, model="b", max_tokens=8)
    assert long.is_alive(), "the bad requests were served while the long stream ran"
    assert long.finish() == want


def test_a_failed_reload_and_a_refused_delete_leave_the_running_stream_and_the_name(server, long_prompts):
    port = server
    post = lambda path: call(f"{url(port)}/v1/adapters", "POST", {"name": "hot", "path": path})  # noqa: E731
    first, other, prompt = two_adapters(port, long_prompts)
    a_text, b_text = text_of(port, model=first, max_tokens=10), text_of(port, model=other, max_tokens=10)
    want_long = stream(port, model=first, prompt=prompt, max_tokens=LONG)
    assert post(f"adapters/{first}")[0] == 200
    long = Background(port, model="hot", prompt=prompt, max_tokens=LONG)
    long.start()
    long.wait_started()

    code, body = post("adapters/broken")
    assert code == 400 and body["error"]["param"] == "path" and "cannot read weights" in body["error"]["message"], body
    assert text_of(port, model="hot", max_tokens=10) == a_text, "the live version stays current"
    code, body = call(f"{url(port)}/v1/adapters/hot", "DELETE")
    assert code == 409 and body["error"]["type"] == "conflict_error", body
    assert text_of(port, model="hot", max_tokens=10) == a_text, "a refused DELETE changed nothing"
    assert post(f"adapters/{other}")[0] == 200
    assert text_of(port, model="hot", max_tokens=10) == b_text, "new requests get the new version at once"
    assert long.is_alive()
    assert long.finish() == want_long, "the running stream kept its version"

    assert call(f"{url(port)}/v1/adapters/hot", "DELETE")[0] == 200
    assert call(f"{url(port)}/v1/adapters/hot", "DELETE")[0] == 404
    assert complete(port, model="hot", max_tokens=2)[0] == 404


def test_a_retrain_under_steady_traffic_reaches_new_requests(server, store, long_prompts):  # noqa: F811
    port = server
    first, other, prompt = two_adapters(port, long_prompts)
    a_text, b_text = text_of(port, model=first, max_tokens=10), text_of(port, model=other, max_tokens=10)
    live = store / "adapters" / "rt"  # a new adapter in the store: served without a restart
    shutil.copytree(store / "adapters" / first, live)
    assert text_of(port, model="rt", max_tokens=10) == a_text
    traffic = [Background(port, model="rt", prompt=prompt, max_tokens=LONG) for _ in range(2)]
    for t in traffic:
        t.start()
        t.wait_started()
    replace_dir(store / "adapters" / other, live)  # rewritten in place, as `rayft train --output` does
    assert text_of(port, model="rt", max_tokens=10) == b_text, "the retrained weights answer at once"
    assert all(t.is_alive() for t in traffic), "rows of the old version ran all along"
    for t in traffic:
        t.finish()
    assert stats()["running_rows"] == 0


def wait_rows(predicate, timeout: float) -> float:
    """Seconds until the engine's running rows satisfy `predicate`."""
    t0 = time.time()
    while not predicate(stats()["running_rows"]):
        assert time.time() - t0 < timeout, f"running rows: {stats()['running_rows']}"
        time.sleep(0.02)
    return time.time() - t0


def open_request(port, body: dict) -> socket.socket:
    """Send a completion request on a raw socket and return it, unread."""
    sock = socket.create_connection(("127.0.0.1", port))
    data = json.dumps({"prompt": "once upon a time", "temperature": 0, **body}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_goes_away_stops_its_generation(server, long_prompts, streamed):
    port = server
    model, prompt = next(iter(long_prompts.items()))
    t0 = time.time()
    code, body = complete(port, model=model, prompt=prompt, max_tokens=LONG)
    full = time.time() - t0  # how long the whole generation takes
    assert body["usage"]["completion_tokens"] == LONG and full > 1.0, "long enough to tell a stop from an end"
    sock = open_request(port, {"model": model, "prompt": prompt, "max_tokens": LONG, "stream": streamed})
    wait_rows(lambda n: n == 1, 30)
    if streamed:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the stream started"
    hang_up(sock)
    gone = wait_rows(lambda n: n == 0, full / 2)
    assert gone < full / 2, (gone, full)
    assert text_of(port, model="c", max_tokens=4), "the server goes on"


def test_stop_strings_over_http_streamed_and_not_give_the_unstopped_text_cut(server):
    """The issue's probe, generated: stop strings drawn from each greedy completion's own text, at
    random characters (spanning tokens, overlapping); streamed deltas and the non-streamed text
    both equal the unstopped text cut before the first stop string."""
    port, rng = server, random.Random(5)
    cases = 0
    for model in ("a", "b", "c"):
        for prompt in ("abc", "hello there", "zzz", "x"):
            full = text_of(port, model=model, prompt=prompt, max_tokens=24)
            if len(full) < 4:
                continue
            start = rng.randrange(len(full) - 2)
            stops = [full[start:start + rng.randint(2, 3)], full[start + 1:start + 3]]
            cut = reference_cut(full, stops)
            code, body = complete(port, model=model, prompt=prompt, max_tokens=24, stop=stops)
            assert code == 200 and body["choices"][0]["text"] == full[:cut], (full, stops, body)
            assert body["choices"][0]["finish_reason"] == "stop"
            assert stream(port, model=model, prompt=prompt, max_tokens=24, stop=stops) == (full[:cut], "stop")
            cases += 1
    assert cases >= 6
