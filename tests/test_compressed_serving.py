"""A compressed store served from its basis: one slot on the device, every adapter in it by its own
name. Over generated stores and batches, a forward through the store equals one through the same
adapters decompressed (`rayft decompress`) and loaded as plain ones; the engine serves any number of
a store's adapters in one batch beside plain adapters and the base; a damaged store is refused with
an error naming the file and what is wrong, while other requests go on."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayft import layout
from rayft.adapters import AdapterModel, Segment, load_adapter
from rayft.adapters.compress import Subspace, compress, decompress, load_subspace, save_subspace
from rayft.adapters.merge import LoraFile, MergeError
from rayft.config import BaseModelConfig
from rayft.model.load import load_base_model
from rayft.serving.engine import AdapterInUseError, AdapterLoadError, GenerationEngine, GenRequest, Sampling
from rayft.serving.store import AdapterStore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(tiny_model_dir):
    model, tok = load_base_model(BaseModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"))
    return model, tok


def random_store(model, rng: random.Random, n: int, components: int | None = None) -> Subspace:
    """`n` random LoRA adapters of one rank and one set of layers (each its own alpha and rsLoRA),
    compressed to `components` (default: drawn)."""
    r = rng.choice([2, 4, 8])
    suffixes = rng.sample(TARGETS, rng.randint(1, 4))
    layers = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes
              and isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    adapters = {}
    for k in range(n):
        config = {"peft_type": "LORA", "r": r, "lora_alpha": rng.choice([4, 8, 16]), "use_rslora": rng.random() < 0.3,
                  "target_modules": suffixes, "bias": "none", "task_type": "CAUSAL_LM"}
        adapter = LoraFile(f"m{k}", config)
        for name, m in layers.items():
            adapter.layers[name] = (torch.randn(r, m.in_features, generator=g) * 0.3,
                                    torch.randn(m.out_features, r, generator=g) * 0.3, 1.0)
        adapters[f"m{k}"] = adapter
    return compress(adapters, components=components or rng.randint(1, n))


def random_segments(rng: random.Random, members: int, rows: int) -> list[tuple[int | None, int, int]]:
    """Consecutive (member or None for the base, start, stop) ranges covering `rows` rows."""
    out, start = [], 0
    while start < rows:
        stop = min(rows, start + rng.randint(1, 3))
        out.append((rng.choice([None, *range(members)]) if rng.random() < 0.85 else None, start, stop))
        start = stop
    return out


@pytest.mark.parametrize("case", range(24))
def test_a_forward_through_the_store_equals_its_adapters_decompressed(case, tiny_model_dir, tmp_path):
    rng = random.Random(case)
    model, _ = base(tiny_model_dir)
    space = random_store(model, rng, rng.randint(2, 7))
    am = AdapterModel(model)
    members = am.add_subspace("store", space)
    assert members == list(space.loadings)
    for name, path in decompress(space, tmp_path / "back").items():
        load_adapter(am, path, f"plain-{name}")
    rows = rng.randint(1, 9)
    ids = torch.randint(0, 100, (rows, rng.randint(1, 7)), generator=torch.Generator().manual_seed(case))
    spans = random_segments(rng, len(members), rows)
    stored = [Segment("store", a, b, m) for m, a, b in spans if m is not None]
    plain = [Segment(f"plain-{members[m]}", a, b) for m, a, b in spans if m is not None]
    with torch.no_grad():
        with am.route(stored):
            got = model(ids).logits
        with am.route(plain):
            want = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_routing_a_store_checks_its_member(tiny_model_dir):
    model, _ = base(tiny_model_dir)
    am = AdapterModel(model)
    am.add_subspace("store", random_store(model, random.Random(0), 3))
    for bad, why in [(Segment("store", 0, 1), "a compressed store"), (Segment("store", 0, 1, 3), "one of 0..2")]:
        with pytest.raises(ValueError, match=why):
            with am.route([bad]):
                pass


@pytest.fixture(scope="module")
def many(tiny_model_dir, tmp_path_factory):
    """A store of 200 adapters under <root>/compressed/many, and a plain adapter beside it."""
    root = tmp_path_factory.mktemp("compressed-root")
    model, _ = base(tiny_model_dir)
    space = random_store(model, random.Random(5), 200, components=8)
    save_subspace(space, root / layout.compressed("many"))
    plain = decompress(Subspace(space.layers, space.components, space.means, space.shapes,
                                {"m3": space.loadings["m3"]}, {"m3": space.configs["m3"]}), root / "adapters")
    (root / "adapters" / "m3").rename(root / "adapters" / "lone")
    return root, space, plain


def test_two_hundred_adapters_of_a_store_serve_in_one_batch_through_two_slots(many, tiny_model_dir, tmp_path):
    """A store takes one of the engine's two slots: 40 of its adapters, a plain adapter and the base
    share every forward, and each request's text is what its adapter decompressed gives alone."""
    root, space, _ = many
    eng = GenerationEngine(*base(tiny_model_dir), max_adapters=2)
    members, _ = eng.load_store("many", root / layout.compressed("many"))
    assert len(members) == 200 and len(eng.versions) == 1 and len(eng.loaded) == 200
    rng = random.Random(1)
    asked = rng.sample(members, 40)
    reqs = [GenRequest([rng.randint(3, 90) for _ in range(rng.randint(1, 6))], name,
                       Sampling(max_tokens=5, temperature=0.0)) for name in asked + asked[:10]]
    reqs += [GenRequest([7, 8, 9], "lone", Sampling(max_tokens=5, temperature=0.0)),
             GenRequest([7, 8, 9], None, Sampling(max_tokens=5, temperature=0.0))]
    paths = {"lone": root / "adapters" / "lone"}
    out = eng.generate(reqs, paths=paths)
    assert len(eng.versions) == 2  # the store and the plain adapter: no eviction, no refusal
    back = decompress(Subspace(space.layers, space.components, space.means, space.shapes,
                               {n: space.loadings[n] for n in asked}, {n: space.configs[n] for n in asked}), tmp_path)
    ref = GenerationEngine(*base(tiny_model_dir), max_adapters=len(asked) + 1)
    want = ref.generate(reqs, paths={**paths, **back})
    assert [o.token_ids for o in out] == [o.token_ids for o in want]
    assert len({tuple(o.token_ids) for o in out[:40]}) > 20  # the adapters differ: the check can fail
    # the device holds one basis, not 200 adapters
    layer = next(iter(eng.am.layers().values()))
    stored = sum(t.numel() for t in layer.adapters[eng.current[asked[0]].slot].buffers())
    assert stored * 10 < 200 * (space.shapes[(layer.name, "A")][0] * (layer.in_features + layer.out_features))


def test_unloading_a_store_or_one_of_its_adapters(many, tiny_model_dir):
    root, _, _ = many
    eng = GenerationEngine(*base(tiny_model_dir), max_adapters=2)
    eng.load_store("many", root / layout.compressed("many"))
    running, _ = eng.step(None, [("k", GenRequest([5, 6], "m1", Sampling(max_tokens=8, temperature=0.0)))],
                          lambda *a: None)
    with pytest.raises(AdapterInUseError, match="'m1'"):
        eng.unload("many")
    assert eng.unload("m2") and "m2" not in eng.loaded and "m1" in eng.loaded  # the store stays
    while running is not None:
        running, _ = eng.step(running, [], lambda *a: None)
    assert eng.unload("many") and not eng.loaded and not eng.versions and not eng.am.subspaces
    assert not eng.unload("many")
    # a plain adapter needing the store's slot evicts it (one slot, as any adapter), and it comes back
    eng = GenerationEngine(*base(tiny_model_dir), max_adapters=1)
    store_path = root / layout.compressed("many")
    got = eng.generate([GenRequest([5], "m7", Sampling(max_tokens=2, temperature=0.0))], paths={"m7": store_path})
    eng.generate([GenRequest([5], "lone", Sampling(max_tokens=2, temperature=0.0))],
                 paths={"lone": root / "adapters" / "lone"})
    assert list(eng.loaded) == ["lone"]
    again = eng.generate([GenRequest([5], "m7", Sampling(max_tokens=2, temperature=0.0))], paths={"m7": store_path})
    assert again[0].token_ids == got[0].token_ids


def test_the_server_s_store_finds_a_compressed_store_s_adapters(many, tmp_path):
    root, _, _ = many
    store = AdapterStore(root)
    found = store.list()
    assert found["lone"] == root / "adapters" / "lone" and found["m0"] == root / layout.compressed("many")
    assert len(found) == 201 and store.find("m199") == root / layout.compressed("many")
    assert store.find("m200") is None
    # files linked out of the root are refused, as an adapter's are
    outside = tmp_path / "outside"
    outside.mkdir()
    linked = root / layout.compressed("linked")
    linked.mkdir(parents=True)
    (linked / layout.SUBSPACE_META).write_text(json.dumps({"layers": [], "shapes": {}, "adapters": {"x1": {}}}))
    (outside / layout.SUBSPACE_BASIS).write_bytes(b"")
    (linked / layout.SUBSPACE_BASIS).symlink_to(outside / layout.SUBSPACE_BASIS)
    assert "x1" not in store.list() and store.find("x1") is None


def damage(src, dst, how: str):
    """A copy of a saved store, damaged one way."""
    import shutil

    shutil.copytree(src, dst)
    meta, basis = dst / layout.SUBSPACE_META, dst / layout.SUBSPACE_BASIS
    tensors = load_file(str(basis))
    if how == "json":
        meta.write_text("{not json")
    elif how == "name":
        d = json.loads(meta.read_text())
        d["adapters"]["../evil"] = next(iter(d["adapters"].values()))
        meta.write_text(json.dumps(d))
    elif how == "empty":
        d = json.loads(meta.read_text())
        d["adapters"] = {}
        meta.write_text(json.dumps(d))
    elif how == "missing":
        del tensors[next(k for k in tensors if k.startswith("loadings."))]
        save_file(tensors, str(basis))
    elif how == "shape":
        key = next(k for k in tensors if k.startswith("means."))
        tensors[key] = tensors[key][:-1].contiguous()
        save_file(tensors, str(basis))
    elif how == "nan":
        key = next(k for k in tensors if k.startswith("components."))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(basis))
    elif how == "truncated":
        basis.write_bytes(basis.read_bytes()[:100])
    return dst


@pytest.mark.parametrize("how,why", [("json", "subspace.json: not a compressed store's description"),
                                     ("name", "adapter name '../evil' is not allowed"),
                                     ("empty", "subspace.json: holds no adapters"),
                                     ("missing", "basis.safetensors: no tensor loadings."),
                                     ("shape", "subspace.json implies"),
                                     ("nan", "is not finite"),
                                     ("truncated", "basis.safetensors: cannot be read")])
def test_a_damaged_store_is_refused_naming_what_is_wrong_while_a_good_request_runs(how, why, many, tiny_model_dir,
                                                                                   tmp_path):
    root, space, _ = many
    small = save_subspace(Subspace(space.layers, space.components, space.means, space.shapes,
                                   {n: space.loadings[n] for n in ("m0", "m1")},
                                   {n: space.configs[n] for n in ("m0", "m1")}), tmp_path / "good")
    bad = damage(small, tmp_path / "bad", how)
    with pytest.raises(MergeError, match=why):
        load_subspace(bad)
    eng = GenerationEngine(*base(tiny_model_dir), max_adapters=2)
    running, _ = eng.step(None, [("good", GenRequest([5, 6], "lone", Sampling(max_tokens=6, temperature=0.0)))],
                          lambda *a: None, paths={"lone": root / "adapters" / "lone"})
    errors = {}
    running, _ = eng.step(running, [("bad", GenRequest([5], "m0", Sampling(max_tokens=2)))], lambda *a: None,
                          paths={"m0": bad}, on_error=errors.__setitem__)
    assert isinstance(errors["bad"], AdapterLoadError) and why.split(":")[-1].strip() in str(errors["bad"])
    assert str(bad) in str(errors["bad"])
    while running is not None:
        running, _ = eng.step(running, [], lambda *a: None)
    with pytest.raises(AdapterLoadError, match="no subspace.json"):
        eng.load_store("x", tmp_path)
    eng.load_store("good", small)  # the good copy loads beside what failed
    assert {"m0", "m1"} <= set(eng.loaded)
