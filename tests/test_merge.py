"""`rayft merge` on PEFT-made adapters of one base that differ in rank, alpha, rsLoRA, rank/alpha
patterns and targets: every layer's merged delta is what the method defines on the dense deltas
PEFT itself computes (`get_delta_weight`); where PEFT's `add_weighted_adapter` is right (cat, svd)
ours equals it, where it is not (`linear`, which averages A and B apart) the difference is shown;
the result loads in PEFT as an ordinary adapter; what cannot be merged is refused by name."""

import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from transformers import AutoModelForCausalLM

from rayft.adapters.merge import MergeError, low_rank, merge, read_lora, save_merge
from rayft.cli import main

TARGETS = [["q_proj", "v_proj"], ["k_proj", "up_proj", "q_proj"], ["o_proj", "down_proj"], ["q_proj", "gate_proj"]]


def make_adapter(model_dir, out, rng: random.Random, **over):
    """A PEFT LoRA adapter with random (non-zero) weights and drawn settings, saved at `out`."""
    torch.manual_seed(rng.randint(0, 10**6))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(r=rng.choice([2, 4, 8]), lora_alpha=rng.choice([4, 8, 16]), use_rslora=rng.random() < 0.3,
                    target_modules=rng.choice(TARGETS), init_lora_weights=False)
    if rng.random() < 0.3:
        settings["rank_pattern"] = {"q_proj": 3}
        settings["alpha_pattern"] = {"q_proj": 5}
    settings.update(over)
    model = get_peft_model(base, LoraConfig(**settings))
    model.save_pretrained(out)
    return out


def peft_deltas(model_dir, path) -> dict[str, torch.Tensor]:
    """Every layer's ΔW as PEFT computes it for the saved adapter."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), path)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    rng = random.Random(7)
    paths = [make_adapter(tiny_model_dir, root / f"a{k}", rng) for k in range(4)]
    return paths, [peft_deltas(tiny_model_dir, p) for p in paths]


def reference(deltas: list[dict], weights, layer, method, density, sign):
    mine = [(d[layer], w) for d, w in zip(deltas, weights) if layer in d]
    tensors, w = [t for t, _ in mine], torch.tensor([w for _, w in mine])
    if method in ("linear", "cat", "svd"):
        return merge_utils.task_arithmetic(tensors, w)
    if method == "ties":
        return merge_utils.ties(tensors, w, density, sign)
    return merge_utils.magnitude_prune(tensors, w, density)


CASES = [(seed, method) for seed in range(4) for method in ("cat", "linear", "svd", "ties", "magnitude_prune")]


@pytest.mark.parametrize("seed,method", CASES)
def test_each_layer_is_what_the_method_defines_on_the_dense_deltas(seed, method, adapters):
    paths, deltas = adapters
    rng = random.Random(seed)
    k = rng.randint(2, 4)
    chosen = rng.sample(range(4), k)
    weights = [round(rng.uniform(-1, 1.5), 2) for _ in chosen]
    density = rng.choice([0.2, 0.5, 1.0])
    sign = rng.choice(["total", "frequency"])
    # the dense methods at full rank: nothing truncated, so the merge must equal the method exactly
    rank = 10**4 if method in ("ties", "magnitude_prune") else None
    result = merge([read_lora(paths[i]) for i in chosen], method, weights, density, rank, sign)
    mine = [deltas[i] for i in chosen]
    layers = sorted({layer for d in mine for layer in d})
    assert sorted(result.layers) == layers, "the union of the adapters' targets"
    for layer in layers:
        want = reference(mine, weights, layer, method, density, sign)
        if method == "svd":  # the best approximation of the sum, at the largest adapter rank
            largest = max(A.shape[0] for i in chosen for A, _, _ in read_lora(paths[i]).layers.values())
            A, B, error = low_rank(want, largest)
            want = B @ A
            assert result.errors[layer] == pytest.approx(error, abs=1e-6)
        torch.testing.assert_close(result.delta(layer), want, atol=1e-5, rtol=1e-4, msg=layer)
        if method in ("cat", "linear"):
            assert result.errors[layer] == 0.0


def peft_merged(model_dir, tmp_path, seed: int, rslora: bool, combinations):
    """Two rank-4 adapters, weights (0.7, 0.4), and a PEFT model holding them as "a" and "b" and
    their merges by PEFT's add_weighted_adapter as "m_<combination>"."""
    rng = random.Random(seed)
    paths = [make_adapter(model_dir, tmp_path / f"p{k}", rng, r=4, use_rslora=rslora, rank_pattern={},
                          alpha_pattern={}, target_modules=["q_proj", "v_proj"]) for k in range(2)]
    weights = [0.7, 0.4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      paths[0], adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    for combination in combinations:
        model.add_weighted_adapter(["a", "b"], weights, f"m_{combination}", combination_type=combination)
    return paths, weights, model


def test_cat_and_svd_equal_peft_and_peft_linear_is_not_the_weighted_sum(tiny_model_dir, tmp_path):
    """PEFT's add_weighted_adapter on two same-rank adapters: cat and svd give our deltas; its
    `linear` (A and B averaged apart) is not Σ w·ΔW, which ours is."""
    paths, weights, model = peft_merged(tiny_model_dir, tmp_path, 3, False, ("cat", "svd", "linear"))
    ours = {m: merge([read_lora(p) for p in paths], m, weights) for m in ("cat", "svd", "linear")}
    gap = 0.0
    for name, module in model.named_modules():
        if not (hasattr(module, "get_delta_weight") and "m_cat" in getattr(module, "lora_A", {})):
            continue
        layer = name.removeprefix("base_model.model.")
        for m in ("cat", "svd"):
            torch.testing.assert_close(ours[m].delta(layer), module.get_delta_weight(f"m_{m}").detach(),
                                       atol=1e-5, rtol=1e-4)
        exact = weights[0] * module.get_delta_weight("a") + weights[1] * module.get_delta_weight("b")
        torch.testing.assert_close(ours["linear"].delta(layer), exact.detach(), atol=1e-6, rtol=1e-5)
        gap = max(gap, float((module.get_delta_weight("m_linear") - exact).abs().max()))
    assert gap > 1e-3, "PEFT's linear merge differs from the weighted sum of the deltas"


def test_dare_keeps_about_density_rescaled_and_is_seeded(adapters):
    paths, deltas = adapters
    loras = [read_lora(p) for p in paths[:2]]
    full = merge(loras, "linear", [1.0, 1.0])
    same = merge(loras, "dare_linear", [1.0, 1.0], density=1.0, rank=10**4)
    for layer in full.layers:
        torch.testing.assert_close(same.delta(layer), full.delta(layer), atol=1e-5, rtol=1e-4)
    one = merge(loras[:1], "dare_linear", [1.0], density=0.5, rank=10**4, seed=1)
    again = merge(loras[:1], "dare_linear", [1.0], density=0.5, rank=10**4, seed=1)
    other = merge(loras[:1], "dare_linear", [1.0], density=0.5, rank=10**4, seed=2)
    layer = next(iter(one.layers))
    dense = deltas[0][layer]
    kept = one.delta(layer)
    torch.testing.assert_close(kept, again.delta(layer))
    assert not torch.allclose(kept, other.delta(layer))
    survived = kept.abs() > 1e-4  # dropped entries come back from the SVD as noise of about 1e-6
    assert 0.35 < survived.float().mean() < 0.65
    torch.testing.assert_close(kept[survived], 2 * dense[survived], atol=1e-5, rtol=1e-4)


def test_a_merge_is_an_ordinary_peft_adapter_and_rayft_merge_writes_it(adapters, tiny_model_dir, tmp_path, capsys):
    paths, deltas = adapters
    out = tmp_path / "merged"
    assert main(["merge", str(paths[0]), str(paths[1]), "--method", "svd", "--weights", "0.5,1", "--rank", "3",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "svd merge of 2 adapter(s): rank 3" in printed and "truncation error" in printed
    result = merge([read_lora(p) for p in paths[:2]], "svd", [0.5, 1.0], rank=3)
    loaded = peft_deltas(tiny_model_dir, out)
    assert sorted(loaded) == sorted(result.layers)
    for layer, delta in loaded.items():
        torch.testing.assert_close(delta, result.delta(layer), atol=1e-6, rtol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    # saving writes the same thing
    save_merge(result, tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_what_cannot_be_merged_is_refused_by_name(adapters, tiny_model_dir, tmp_path, capsys):
    paths, _ = adapters
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", random.Random(1), use_dora=True)
    with pytest.raises(MergeError, match="a DoRA adapter; its magnitude vectors rescale"):
        read_lora(dora)
    with pytest.raises(MergeError, match="not found"):
        read_lora(tmp_path / "nowhere")
    loras = [read_lora(p) for p in paths[:2]]
    for kwargs, problem in [(dict(method="mean"), "method 'mean'"), (dict(method="ties", density=0.0), "density"),
                            (dict(method="cat", weights=[1.0]), "weights: 1 given for 2 adapters"),
                            (dict(method="ties", majority_sign="most"), "majority_sign"),
                            (dict(method="svd", rank=0), "rank: 0")]:
        with pytest.raises(MergeError, match=problem):
            merge(loras, **kwargs)
    other = json.loads((paths[1] / "adapter_config.json").read_text())
    loras[1].config = {**other, "base_model_name_or_path": "another/base"}
    with pytest.raises(MergeError, match="adapters of different base models"):
        merge(loras, "cat")
    assert main(["merge", str(paths[0]), "--method", "cat", "--weights", "a", "--output", str(tmp_path / "x")]) == 2
    assert "--weights 'a'" in capsys.readouterr().out


@pytest.mark.parametrize("family,variant", [("llama", "lora"), ("llama", "rslora"), ("llama", "dora"),
                                            ("gpt2", "lora"), ("llama", "merge")])
def test_rayft_export_writes_a_model_whose_logits_are_base_plus_adapter(family, variant, tiny_model_dir, adapters,
                                                                        tmp_path, capsys):
    """The exported directory loads in plain transformers with PEFT's logits of base + adapter (a
    GPT-2 Conv1D base and a merge included)."""
    from test_model_families import FAMILIES

    if family == "gpt2":
        cls, kwargs = FAMILIES["gpt2"]
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cls(**kwargs)).save_pretrained(tmp_path / "gpt2")
        for f in tiny_model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (tmp_path / "gpt2" / f.name).write_bytes(f.read_bytes())
        base_dir = tmp_path / "gpt2"
        adapter = make_adapter(base_dir, tmp_path / "a", random.Random(0), target_modules=["c_attn", "c_fc"],
                               rank_pattern={}, alpha_pattern={}, fan_in_fan_out=True)
    elif variant == "merge":
        base_dir, adapter = tiny_model_dir, tmp_path / "m"
        save_merge(merge([read_lora(p) for p in adapters[0][:3]], "ties", [1.0, 0.5, 0.8], density=0.5), adapter)
    else:
        base_dir = tiny_model_dir
        adapter = make_adapter(base_dir, tmp_path / "a", random.Random(1), use_rslora=variant == "rslora",
                               use_dora=variant == "dora")
    assert main(["export", str(adapter), "--output", str(tmp_path / "full"), "--base-model", str(base_dir),
                 "--dtype", "float32"]) == 0
    assert "folded into its base" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     adapter).eval()
    ids = torch.randint(3, 60, (2, 10))
    with torch.no_grad():
        want, got = peft(ids).logits, exported(ids).logits
        base = peft.get_base_model()
        with peft.disable_adapter():
            untuned = base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - untuned).abs().max() > 1e-3, "the adapter changes the model"
    assert (tmp_path / "full" / "config.json").is_file() and list((tmp_path / "full").glob("*.safetensors"))
    assert (tmp_path / "full" / "tokenizer_config.json").is_file()


def test_peft_merges_rslora_adapters_with_the_wrong_scale_and_ours_does_not(tiny_model_dir, tmp_path):
    """PEFT 0.21's add_weighted_adapter gives the merged adapter lora_alpha = r but keeps use_rslora
    from the first adapter, so its scale is √r instead of 1: cat and svd of rsLoRA adapters come out
    √r times too large. Ours is the weighted sum (cat) and its best rank-r approximation (svd)."""
    import math

    paths, weights, model = peft_merged(tiny_model_dir, tmp_path, 5, True, ("cat", "svd"))
    ours = {m: merge([read_lora(p) for p in paths], m, weights) for m in ("cat", "svd")}
    checked = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "get_delta_weight") and "m_cat" in getattr(module, "lora_A", {})):
            continue
        layer = name.removeprefix("base_model.model.")
        exact = (weights[0] * module.get_delta_weight("a") + weights[1] * module.get_delta_weight("b")).detach()
        torch.testing.assert_close(ours["cat"].delta(layer), exact, atol=1e-6, rtol=1e-5)
        for m, r in (("cat", 8), ("svd", 4)):
            torch.testing.assert_close(module.get_delta_weight(f"m_{m}").detach(), math.sqrt(r) * ours[m].delta(layer),
                                       atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len(ours["cat"].layers) > 0
