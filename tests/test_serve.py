"""The Serve app over real HTTP: OpenAI's API and client, streaming, hot-loading, bad input, load."""

import http.client
import json
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import ray
from conftest import free_port
from ray import serve
from test_serving_engine import ADAPTERS, store  # noqa: F401  (the store fixture: adapters a, b, c)

from rayft.config import ServeConfig
from rayft.serving.server import build


@pytest.fixture(scope="module")
def server(store, tiny_model_dir):  # noqa: F811
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the base model comes from the adapters' adapter_config.json
    serve.run(build(ServeConfig(store=store, max_adapters=2, max_tokens_limit=512)), name="rayft", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def call(url, method="GET", body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_every_adapter_with_its_parent(server, tiny_model_dir):
    code, body = call(f"{server}/v1/models")
    assert code == 200
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {tiny_model_dir.name, *ADAPTERS}
    assert ids["a"]["parent"] == tiny_model_dir.name and ids[tiny_model_dir.name]["parent"] is None


def test_the_openai_client_completes_chats_and_streams(server, tiny_model_dir):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    done = client.completions.create(model="a", prompt="hello", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens == len(tokenizer_of(tiny_model_dir).encode("hello"))
    again = client.completions.create(model="a", prompt="hello", max_tokens=8, temperature=0)
    assert again.choices[0].text == done.choices[0].text, "greedy is deterministic"
    base = client.completions.create(model=tiny_model_dir.name, prompt="hello", max_tokens=8, temperature=0)
    assert base.choices[0].text != done.choices[0].text, "the adapter changes the output"

    chunks = list(client.completions.create(model="a", prompt="hello", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == chat.choices[0].message.content

    sampled = [client.completions.create(model="c", prompt="x", max_tokens=8, temperature=1.0, seed=3).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1], "a seed makes sampling repeatable"
    stop = client.completions.create(model="a", prompt="hello", max_tokens=8, temperature=0, stop=[done.choices[0].text[2:4]])
    assert stop.choices[0].finish_reason == "stop" and stop.choices[0].text == done.choices[0].text[:2]


def test_concurrent_requests_for_many_adapters_all_succeed_and_match_alone(server, tiny_model_dir):
    models = ["a", "b", "c", tiny_model_dir.name]  # three adapters through an LRU of two, and the base
    alone = {m: call(f"{server}/v1/completions", "POST", {"model": m, "prompt": "same prompt", "max_tokens": 6,
                                                          "temperature": 0})[1]["choices"][0]["text"] for m in models}
    jobs = [models[i % 4] for i in range(300)]
    with ThreadPoolExecutor(300) as pool:  # all at once, on loopback
        results = list(pool.map(lambda m: call(f"{server}/v1/completions", "POST", {
            "model": m, "prompt": "same prompt", "max_tokens": 6, "temperature": 0}), jobs))
    assert all(code == 200 for code, _ in results), [b for c, b in results if c != 200][:3]
    for m, (_, body) in zip(jobs, results):
        assert body["choices"][0]["text"] == alone[m], m


def test_hot_load_unload_and_a_new_adapter_appears_without_restart(server, store):  # noqa: F811
    shutil.copytree(store / "adapters" / "a", store / "adapters" / "fresh")
    code, body = call(f"{server}/v1/models")
    assert "fresh" in {m["id"] for m in body["data"]}
    code, body = call(f"{server}/v1/completions", "POST", {"model": "fresh", "prompt": "q", "max_tokens": 2})
    assert code == 200
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "alias", "path": "adapters/b"})
    assert code == 200 and body["load_seconds"] < 5
    assert call(f"{server}/v1/completions", "POST", {"model": "alias", "prompt": "q", "max_tokens": 2})[0] == 200
    assert call(f"{server}/v1/adapters/alias", "DELETE")[0] == 200
    assert call(f"{server}/v1/adapters/alias", "DELETE")[0] == 404
    base = call(f"{server}/v1/models")[1]["data"][0]["id"]
    code, body = call(f"{server}/v1/adapters", "POST", {"name": base, "path": "adapters/b"})
    assert code == 400 and body["error"]["param"] == "name" and "base model" in body["error"]["message"], body
    assert [m["id"] for m in call(f"{server}/v1/models")[1]["data"]].count(base) == 1


def test_bad_input_gets_openai_style_errors_and_the_rest_keeps_serving(server, store):  # noqa: F811
    code, body = call(f"{server}/v1/completions", "POST", {"model": "nope", "prompt": "x"})
    assert code == 404 and body["error"]["code"] == "model_not_found" and "nope" in body["error"]["message"]
    code, body = call(f"{server}/v1/completions", "POST", raw=b"{not json")
    assert code == 400 and "malformed JSON" in body["error"]["message"]
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": "many"})
    assert code == 400 and body["error"]["param"] == "max_tokens"
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a"})
    assert code == 400 and body["error"]["param"] == "prompt"
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 513})
    assert code == 400 and "above this server's limit of 512" in body["error"]["message"]
    for path in ("../adapters/a", "/etc", "adapters/../../x"):
        code, body = call(f"{server}/v1/adapters", "POST", {"name": "evil", "path": path})
        assert code == 400 and body["error"]["param"] == "path", path
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "../evil", "path": "adapters/a"})
    assert code == 400 and body["error"]["param"] == "name"
    code, body = call(f"{server}/v1/completions", "POST", {"model": "../adapters/a", "prompt": "x"})
    assert code == 404

    broken = store / "adapters" / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((store / "adapters" / "a" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    code, body = call(f"{server}/v1/completions", "POST", {"model": "broken", "prompt": "x"})
    assert code == 500 and "adapter 'broken'" in body["error"]["message"] and "cannot read weights" in body["error"]["message"]
    assert call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 2})[0] == 200


def raw(url, method="POST", body: bytes | None = None, headers=None):
    """(status, content type, body bytes) of one request, whatever comes back."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, u.path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("content-type", ""), r.read()
    finally:
        conn.close()


def assert_openai_error(status, ctype, data, what):
    assert 400 <= status < 500, (status, data[:300], what)
    assert ctype.startswith("application/json"), (ctype, data[:300], what)
    body = json.loads(data)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (body, what)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], (body, what)
    return body["error"]


NOT_STR = [5, 1.5, True, {}, [1], {"a": 1}]
SURROGATES = ["\ud800", "x\udfffy", "\ud83d"]
NOT_INT = ["5", 2.0, True, [], {}, "x" * 5000]
BAD = {  # per field, values OpenAI refuses too (wrong type, out of range, not Unicode)
    "model": NOT_STR + SURROGATES,
    "prompt": NOT_STR + SURROGATES + [[], ["a", "b"], ["a", "\udfff"], None],
    "messages": [[], "hi", None, {"role": "user"}, [{"role": "user"}], [{"role": "bot", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": "\ud800"}], [{"role": 1, "content": "x"}]],
    "max_tokens": NOT_INT + [0, -1, 10**30],
    "temperature": ["1", True, -0.1, 2.5, float("nan"), float("inf"), []],
    "top_p": [0, 1.5, "1", True, float("-inf")],
    "stop": [1, ["a", 2], [{"a": 1}], True] + SURROGATES,
    "seed": [2**63, -(2**63) - 1, 10**40, "3", 1.5, True],
    "stream": ["yes", 1, "true", 0, []],
    "stream_options": [{"include_usage": "yes"}, "x", {"include_usage": True}],
    "n": [2, "1", 0, True],
}
MALFORMED = [b"{not json", b'{"model": "a", "prompt": "hi"', b"[1, 2]", b'"x"', b"null", b"", b"\xff{}", b"\xff\xfe{}",
             b'{"model": "a", "prompt": "\xc3\x28"}', b'{"model": "a", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
             b'{"model": "a", "prompt": "hi", "seed": 1e999}', b'{"model": "a", "prompt": "hi", "top_p": -Infinity}']


def _bad_bodies(rng: random.Random):
    """Request bodies with one thing wrong each, as bytes: (route, body, the param it must name or None)."""
    good = {"/v1/completions": {"model": "a", "prompt": "hi", "max_tokens": 2},
            "/v1/chat/completions": {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    out = []
    for route, body in good.items():
        fields = [f for f in BAD if f != {"/v1/completions": "messages", "/v1/chat/completions": "prompt"}[route]]
        for _ in range(40):
            field = rng.choice(fields)
            out.append((route, json.dumps({**body, field: rng.choice(BAD[field])}).encode(), field))
        out += [(route, data, None) for data in MALFORMED]
    for name in ["", ".x", "-x", "a/b", "a\n", "a\x00", "x" * 101, "\ud800", "a b", 5, None, ["a"]]:
        out.append(("/v1/adapters", json.dumps({"name": name, "path": "adapters/a"}).encode(), "name"))
    for path in ["a\x00b", "x" * 300, "a/" * 3000, "../x", "/etc", 7, "\udfff", None]:
        out.append(("/v1/adapters", json.dumps({"name": "ok", "path": path}).encode(), "path"))
    return out


def _streamed_text(url: str, body: dict) -> str:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    parts = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: {"):
                parts += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(parts)


def test_every_bad_body_is_a_4xx_in_openai_s_error_shape_naming_the_field(server, tiny_model_dir):
    rng = random.Random(0)
    cases = _bad_bodies(rng)
    assert len(cases) > 100
    long = {"model": "c", "prompt": "while the bad ones come", "max_tokens": 500, "temperature": 0}
    alone = call(f"{server}/v1/completions", "POST", long)[1]["choices"][0]["text"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_streamed_text, server, long)  # a good request runs through all of them
        for route, data, param in cases:
            status, ctype, out = raw(f"{server}{route}", body=data)
            err = assert_openai_error(status, ctype, out, (route, data[:200]))
            if param is not None:
                assert err["param"] == param or (err["param"] or "").startswith(param + "."), (err, data[:200])
            if data.startswith(b"{not"):
                assert err["param"] is None and "character 1" in err["message"], err
            if b"\xc3\x28" in data or data == b"\xff{}":
                assert "UTF-8" in err["message"], err
        assert running.result() == alone, "a good stream is untouched by the bad requests beside it"
    for method, route in [("GET", "/v1/nothing"), ("DELETE", "/v1/completions"), ("POST", "/v1/models")]:
        assert_openai_error(*raw(f"{server}{route}", method), route)
    # the largest seed OpenAI takes is served, null reads as left out; a model that is not there is a 404
    assert call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 2, "seed": 2**63 - 1})[0] == 200
    assert call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 2, "temperature": None,
                                                     "top_p": None, "n": None, "stream": None, "seed": None})[0] == 200
    status, ctype, out = raw(f"{server}/v1/completions", body=json.dumps({"model": "a\x00", "prompt": "x"}).encode())
    assert status == 404 and assert_openai_error(status, ctype, out, "nul model")["param"] == "model"
    assert call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 2})[0] == 200


def test_include_usage_ends_a_stream_with_a_usage_chunk(server, tiny_model_dir):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    whole = client.completions.create(model="a", prompt="hello", max_tokens=7, temperature=0)
    chunks = list(client.completions.create(model="a", prompt="hello", max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    stream = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert stream[-1].choices == [] and stream[-1].usage.model_dump() == chat.usage.model_dump()
    assert all(c.usage is None for c in stream[:-1])
    plain = list(client.completions.create(model="a", prompt="hello", max_tokens=7, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain), "no usage chunk unless asked for"
    code, body = call(f"{server}/v1/completions", "POST",
                      {"model": "a", "prompt": "x", "stream_options": {"include_usage": True}})
    assert code == 400 and body["error"]["param"] == "stream_options"


def _stream_gaps(url: str, stop: threading.Event, gaps: list, streams: list):
    """Streams long completions one after another until `stop`; records the seconds between chunks."""
    body = json.dumps({"model": "a", "prompt": "a long one", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    while not stop.is_set():
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            last = None
            for line in r:
                now = time.perf_counter()
                if line.startswith(b"data: "):
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
        streams.append(time.perf_counter())


def test_huge_bodies_are_refused_fast_while_streams_keep_flowing(server):
    stop, gaps, streams = threading.Event(), [], []
    t = threading.Thread(target=_stream_gaps, args=(server, stop, gaps, streams), daemon=True)
    t.start()
    try:
        while len(gaps) < 20:
            time.sleep(0.05)
        probes = {
            "over the body limit": (json.dumps({"model": "a", "prompt": "x" * (10 * 2**20)}).encode(), 413),
            "a prompt no model position count can hold": (json.dumps({"model": "a", "prompt": "y" * (3 * 2**20)}).encode(), 400),
            "chunked, over the limit": (iter([b'{"model": "a", "prompt": "' + b"z" * 2**20] * 6), 413),
        }
        t0 = time.perf_counter()
        for what, (data, want) in probes.items():
            start = time.perf_counter()
            status, ctype, out = raw(f"{server}/v1/completions", body=data)  # an iterable goes chunked
            err = assert_openai_error(status, ctype, out, what)
            assert status == want, (what, status, err)
            assert time.perf_counter() - start < 3, f"{what}: answered in {time.perf_counter() - start:.1f} s"
            if want == 400:
                assert err["param"] == "prompt" and "positions" in err["message"], err
        t1 = time.perf_counter()
        while len(streams) < 1 or not any(at > t1 for at, _ in gaps):
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=120)
    during = [g for at, g in gaps if t0 <= at <= t1 + 0.5]
    assert during and max(during) < 1.0, f"the stream stalled {max(during or [0]):.2f} s while the big bodies came"


def test_adapter_files_linked_out_of_the_store_are_not_served(server, store, tiny_model_dir, tmp_path):  # noqa: F811
    outside = tmp_path / "outside"
    shutil.copytree(store / "adapters" / "a", outside)
    for name, linked in [("weights-out", "adapter_model.safetensors"), ("config-out", "adapter_config.json")]:
        d = store / "adapters" / name
        shutil.copytree(store / "adapters" / "a", d)
        (d / linked).unlink()
        (d / linked).symlink_to(outside / linked)
        code, body = call(f"{server}/v1/adapters", "POST", {"name": f"{name}-2", "path": f"adapters/{name}"})
        assert code == 400 and body["error"]["param"] == "path" and "leaves the store" in body["error"]["message"]
        assert call(f"{server}/v1/completions", "POST", {"model": name, "prompt": "x", "max_tokens": 2})[0] == 404
    # an adapter under the base model's name is unreachable (the name means the base): listed once
    shutil.copytree(store / "adapters" / "a", store / "adapters" / tiny_model_dir.name)
    ids = [m["id"] for m in call(f"{server}/v1/models")[1]["data"]]
    assert len(ids) == len(set(ids)) and "weights-out" not in ids and "config-out" not in ids and "a" in ids


def test_a_merge_posted_at_run_time_is_served_under_its_own_name(server, store):  # noqa: F811
    """POST /v1/adapters with a merge spec: `rayft merge` of served adapters, made in the server and
    served by name. a merged with a copy of itself at weights 0.5 + 0.5 is a again: the same text."""
    shutil.copytree(store / "adapters" / "a", store / "adapters" / "a-copy", dirs_exist_ok=True)
    spec = {"adapters": ["a", "a-copy"], "method": "linear", "weights": [0.5, 0.5]}
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "a-twice", "merge": spec})
    assert code == 200, body
    ask = {"prompt": "abc", "max_tokens": 6, "temperature": 0}
    merged = call(f"{server}/v1/completions", "POST", {"model": "a-twice", **ask})
    alone = call(f"{server}/v1/completions", "POST", {"model": "a", **ask})
    assert merged[0] == alone[0] == 200 and merged[1]["choices"][0]["text"] == alone[1]["choices"][0]["text"]
    assert "a-twice" in {m["id"] for m in call(f"{server}/v1/models")[1]["data"]}
    # what cannot be merged is a 4xx naming it, and the server keeps serving
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "m2", "merge": {"adapters": ["a", "b"],
                                                                                "method": "cat"}})
    assert code == 400 and "a DoRA adapter" in body["error"]["message"] and body["error"]["param"] == "merge", body
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "m3", "merge": {"adapters": ["a", "nope"],
                                                                                "method": "cat"}})
    assert code == 404 and "merge.adapters[1]: no adapter 'nope'" in body["error"]["message"], body
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "m4", "path": "adapters/a",
                                                        "merge": {"adapters": ["a"], "method": "cat"}})
    assert code in (400, 422) and "exactly one of path" in json.dumps(body), body
    assert call(f"{server}/v1/completions", "POST", {"model": "a", **ask})[0] == 200


def test_a_compressed_store_serves_each_of_its_adapters_by_name_in_one_slot(server, store, tiny_model_dir):  # noqa: F811
    """Adapters compressed into one store (under compressed/, or POSTed by path) are served by their
    own names, each answering as its decompressed adapter does; twelve of them, a plain adapter and
    the base at once fit the server's two slots (the store takes one)."""
    from test_compressed_serving import base, random_store

    from rayft.adapters.compress import Subspace, decompress, save_subspace

    model, _ = base(tiny_model_dir)
    space = random_store(model, random.Random(2), 16, components=6)

    def named(prefix: str, picked=None) -> Subspace:
        picked = picked or list(space.loadings)
        return Subspace(space.layers, space.components, space.means, space.shapes,
                        {f"{prefix}{n}": space.loadings[n] for n in picked},
                        {f"{prefix}{n}": space.configs[n] for n in picked})

    save_subspace(named("z"), store / "compressed" / "zoo")
    decompress(named("plain-z", ["m0", "m1", "m2", "m3"]), store / "adapters")
    listed = {m["id"]: m for m in call(f"{server}/v1/models")[1]["data"]}
    assert listed["zm15"]["root"] == str(store / "compressed" / "zoo") and listed["zm15"]["parent"] == tiny_model_dir.name
    ask = {"prompt": "tell me", "max_tokens": 6, "temperature": 0}
    models = [f"zm{k}" for k in range(12)] + ["a", tiny_model_dir.name]
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: call(f"{server}/v1/completions", "POST", {"model": m, **ask}), models))
    assert all(code == 200 for code, _ in together), together
    texts = {m: body["choices"][0]["text"] for m, (_, body) in zip(models, together)}
    for k in range(4):  # as its decompressed copy alone
        code, body = call(f"{server}/v1/completions", "POST", {"model": f"plain-zm{k}", **ask})
        assert code == 200 and body["choices"][0]["text"] == texts[f"zm{k}"]
    assert len(set(texts.values())) > 6
    # a merge made at run time reads a store's adapter as any other (zm1 half and half is zm1)
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "zm1-twice", "merge": {
        "adapters": ["zm1", "plain-zm1"], "method": "linear", "weights": [0.5, 0.5]}})
    assert code == 200, body
    code, body = call(f"{server}/v1/completions", "POST", {"model": "zm1-twice", **ask})
    assert code == 200 and body["choices"][0]["text"] == texts["zm1"]
    # POSTed by path: every adapter in it served; DELETE by the store's name ends them all
    save_subspace(named("y", ["m0", "m1"]), store / "elsewhere" / "two")
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "two", "path": "elsewhere/two"})
    assert code == 200 and body["adapters"] == ["ym0", "ym1"], body
    code, body = call(f"{server}/v1/completions", "POST", {"model": "ym0", **ask})
    assert code == 200 and body["choices"][0]["text"] == texts["zm0"]
    assert call(f"{server}/v1/adapters/two", "DELETE")[0] == 200
    assert call(f"{server}/v1/completions", "POST", {"model": "ym1", **ask})[0] == 404
    # a damaged store is refused naming the file, and the rest keeps serving
    (store / "elsewhere" / "broken").mkdir()
    (store / "elsewhere" / "broken" / "subspace.json").write_text("{oops")
    code, body = call(f"{server}/v1/adapters", "POST", {"name": "broken", "path": "elsewhere/broken"})
    assert code == 400 and body["error"]["param"] == "path" and "subspace.json" in body["error"]["message"], body
    assert call(f"{server}/v1/completions", "POST", {"model": "zm3", **ask})[1]["choices"][0]["text"] == texts["zm3"]
