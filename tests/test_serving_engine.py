"""The serving engine: mixed-adapter batches with a KV cache, equal to each adapter merged alone."""

import pytest
import torch

from rayft.adapters import AdapterModel, save_adapter
from rayft.config import AdapterConfig, BaseModelConfig
from rayft.model.load import load_base_model
from rayft.serving.engine import AdapterLoadError, GenerationEngine, GenRequest, Sampling
from rayft.serving.store import AdapterStore, StoreError
from rayft.train.evaluate import greedy_generate

ADAPTERS = {
    "a": AdapterConfig(name="a", r=4, alpha=8),
    "b": AdapterConfig(name="b", variant="dora", r=8, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "c": AdapterConfig(name="c", variant="vera", r=16, target_modules=["gate_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    """A store with three adapters of different variants and visibly non-zero weights."""
    root = tmp_path_factory.mktemp("store")
    model, _ = load_base_model(BaseModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"))
    am = AdapterModel(model)
    g = torch.Generator().manual_seed(0)
    for name, cfg in ADAPTERS.items():
        am.add_adapter(cfg, seed=1)
        with torch.no_grad():
            for p in am.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(am, name, root / "adapters" / name, base_model=str(tiny_model_dir))
    return root


def engine_for(tiny_model_dir, **kw):
    model, tok = load_base_model(BaseModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"))
    return GenerationEngine(model, tok, **kw)


def test_a_mixed_batch_equals_each_adapter_merged_alone(tiny_model_dir, store):
    eng = engine_for(tiny_model_dir)
    found = AdapterStore(store).list()
    assert set(found) == set(ADAPTERS)
    for name, path in found.items():
        eng.load(name, path)
    tok = eng.tokenizer
    prompts = ["hello there", "abc", "the quick brown fox", "xyz xyz", "a", "lorem ipsum dolor"]
    which = ["a", None, "b", "a", "c", "b"]
    reqs = [GenRequest(tok.encode(p), w, Sampling(max_tokens=12, temperature=0)) for p, w in zip(prompts, which)]
    deltas = {}
    outs = eng.generate(reqs, on_delta=lambda i, t, f, n: deltas.setdefault(i, []).append((t, f, n)))

    ref_model, _ = load_base_model(BaseModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"))
    ref = AdapterModel(ref_model)
    from rayft.adapters.peft_format import load_adapter

    for name, path in found.items():
        load_adapter(ref, path, name)
    for i, (p, w) in enumerate(zip(prompts, which)):
        if w is None:
            want = greedy_generate(ref, tok, [tok.encode(p)], None, 12)[0]
        else:
            with ref.merged(w):  # the adapter folded into the base weights
                want = greedy_generate(ref, tok, [tok.encode(p)], None, 12)[0]
        assert outs[i].text == want, (i, w)
        assert "".join(t for t, _, _ in deltas[i]) == outs[i].text, "the deltas add up to the text"
        assert deltas[i][-1][1] == outs[i].finish_reason in ("stop", "length")
        assert deltas[i][-1][2] == len(outs[i].token_ids)
        assert outs[i].prompt_tokens == len(tok.encode(p))
    assert len({o.text for o in outs}) > 1


def test_sampling_seed_stop_and_max_tokens(tiny_model_dir, store):
    eng = engine_for(tiny_model_dir)
    eng.load("a", store / "adapters" / "a")
    ids = eng.tokenizer.encode("seeded")
    sample = lambda seed, **kw: eng.generate([GenRequest(ids, "a", Sampling(max_tokens=10, temperature=1.0, seed=seed, **kw))])[0]  # noqa: E731
    assert sample(7).text == sample(7).text, "a seed makes sampling repeatable"
    assert len({sample(s).text for s in range(6)}) > 1
    out = sample(7, top_p=1e-9)  # nucleus of one token: greedy
    greedy = eng.generate([GenRequest(ids, "a", Sampling(max_tokens=10, temperature=0))])[0]
    assert out.text == greedy.text
    assert len(greedy.token_ids) == 10 and greedy.finish_reason == "length"
    stop = greedy.text[3:5]
    cut = eng.generate([GenRequest(ids, "a", Sampling(max_tokens=10, temperature=0, stop=[stop]))])[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[: greedy.text.find(stop)]


def test_lru_hot_load_unload_and_a_corrupt_adapter(tiny_model_dir, store, tmp_path):
    eng = engine_for(tiny_model_dir, max_adapters=2)
    for name in ("a", "b", "c"):
        assert eng.load(name, store / "adapters" / name) < 5.0
    assert list(eng.loaded) == ["b", "c"], "the least recently used one made room"
    with pytest.raises(AdapterLoadError, match="'a' is not loaded"):
        eng.generate([GenRequest([1, 2], "a", Sampling())])
    eng.generate([GenRequest([1, 2], "b", Sampling(max_tokens=1))])  # b is now the most recent
    eng.load("a", store / "adapters" / "a")
    assert list(eng.loaded) == ["b", "a"]
    assert eng.unload("b") and not eng.unload("b")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((store / "adapters" / "a" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match="adapter 'bad'.*cannot read weights"):
        eng.load("bad", bad)
    assert list(eng.loaded) == ["a"] and len(eng.am.configs) == 1, "the failed load left nothing behind"
    assert eng.generate([GenRequest([1, 2], "a", Sampling(max_tokens=2, temperature=0))])[0].token_ids


def test_the_store_refuses_paths_that_leave_it(store):
    s = AdapterStore(store)
    assert s.find("a") == (store / "adapters" / "a").resolve() and s.find("zzz") is None
    assert s.inside("adapters/a") == (store / "adapters" / "a").resolve()
    for bad in ("../x", "adapters/../../x", "/etc", "/tmp"):
        with pytest.raises(StoreError):
            s.inside(bad)
    for bad in ("../a", "a/b", ".hidden", ""):
        with pytest.raises(StoreError, match="adapter name"):
            s.find(bad)


def test_requests_joining_a_running_batch_get_the_same_output_as_alone(tiny_model_dir, store):
    """Continuous batching: new rows are prefilled and merged into the running batch between
    tokens (caches of different lengths, rows regrouped by adapter), old rows retire as they end."""
    eng = engine_for(tiny_model_dir, max_adapters=3)
    tok = eng.tokenizer
    greedy = lambda p, a, n: GenRequest(tok.encode(p), a, Sampling(max_tokens=n, temperature=0))  # noqa: E731
    first = [greedy("a long first prompt here", "b", 12), greedy("short", None, 3), greedy("mid prompt", "a", 9)]
    later = [greedy("x", "c", 6), greedy("a much longer prompt than any other one so far", "a", 8),
             greedy("base again", None, 5)]
    paths = {n: store / "adapters" / n for n in ADAPTERS}
    alone = [eng.generate([r], paths=paths)[0].text for r in first + later]

    texts: dict = {}
    collect = lambda key, t, f, n: texts.__setitem__(key, texts.get(key, "") + t)  # noqa: E731
    running, _ = eng.step(None, [(i, r) for i, r in enumerate(first)], collect, paths)
    for _ in range(4):  # "short" has ended by now
        running, _ = eng.step(running, [], collect, paths)
    assert len(running.rows) == 2 and eng.in_use == {"a", "b"}
    with pytest.raises(AdapterLoadError, match="generating for running requests"):
        eng.unload("b")
    running, _ = eng.step(running, [(3 + i, r) for i, r in enumerate(later)], collect, paths)
    assert [r.req.adapter for r in running.rows] == sorted([r.req.adapter for r in running.rows], key=lambda a: (a is not None, a or ""))
    while running is not None:
        running, _ = eng.step(running, [], collect, paths)
    assert [texts[i] for i in range(6)] == alone
    assert eng.in_use == set() and eng.unload("b")
