"""The Serve app over real HTTP: OpenAI's API and client, streaming, hot-loading, bad input, load."""

import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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
    serve.run(build(ServeConfig(store=store, max_adapters=2, max_tokens_limit=64)), name="rayft", route_prefix="/")
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


def test_bad_input_gets_openai_style_errors_and_the_rest_keeps_serving(server, store):  # noqa: F811
    code, body = call(f"{server}/v1/completions", "POST", {"model": "nope", "prompt": "x"})
    assert code == 404 and body["error"]["code"] == "model_not_found" and "nope" in body["error"]["message"]
    code, body = call(f"{server}/v1/completions", "POST", raw=b"{not json")
    assert code == 400 and "malformed JSON" in body["error"]["message"]
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": "many"})
    assert code == 400 and body["error"]["param"] == "max_tokens"
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a"})
    assert code == 400 and body["error"]["param"] == "prompt"
    code, body = call(f"{server}/v1/completions", "POST", {"model": "a", "prompt": "x", "max_tokens": 65})
    assert code == 400 and "above this server's limit of 64" in body["error"]["message"]
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
