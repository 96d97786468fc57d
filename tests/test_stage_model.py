"""A model cut into pipeline stages computes what the whole model computes, on every family, with
adapters routed per token: the same hidden states forward, the same adapter gradients backward,
the same parameter names (so checkpoints and PEFT files do not depend on the stage count)."""

import copy
import random

import pytest
import torch
import transformers
from test_model_families import FAMILIES, VOCAB

from rayft.adapters import AdapterError, AdapterModel, Segment
from rayft.config import AdapterConfig
from rayft.model.load import load_stage
from rayft.model.stages import STAGEABLE, SkippedLayer, StageSpec, decoder_layers, split_stage

LAYERS = 5


def build(family: str, seed: int = 0):
    cls, kwargs = FAMILIES[family]
    kwargs = dict(kwargs)
    kwargs["n_layer" if family == "gpt2" else "num_hidden_layers"] = LAYERS
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cls(**kwargs)).float()


def random_split(rng: random.Random) -> list[range]:
    stages = rng.randint(2, 4)
    cuts = sorted(rng.sample(range(1, LAYERS), stages - 1))
    bounds = [0, *cuts, LAYERS]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def adapters(rng: random.Random) -> list[AdapterConfig]:
    out = []
    for name in ("a", "b"):
        variant = rng.choice(["lora", "dora", "vera"])
        out.append(AdapterConfig(name=name, variant=variant, r=rng.choice([2, 4]), alpha=8,
                                 dropout=rng.choice([0.0, 0.2]), target_modules="all-linear"))
    return out


def routed(am: AdapterModel, n: int, split_at: int):
    return am.route([Segment("a", 0, split_at), Segment("b", split_at, n)], per_token=True)


CASES = [(family, seed) for seed in range(2) for family in FAMILIES]


@pytest.mark.parametrize("family,seed", CASES)
def test_stages_compute_what_the_whole_model_does_forward_and_backward(family, seed):
    rng = random.Random(f"{family}-{seed}")
    whole = build(family, seed)
    split = random_split(rng)
    configs = adapters(rng)
    n = rng.randint(6, 14)
    ids = torch.randint(0, VOCAB, (1, n))
    cut = rng.randint(1, n - 1)
    lengths = [cut, n - cut]
    positions = torch.cat([torch.arange(k) for k in lengths])[None]
    target = torch.randn(1, n, whole.config.hidden_size)

    parts = [split_stage(copy.deepcopy(whole), StageSpec(i, len(split), r)) for i, r in enumerate(split)]
    am_whole = AdapterModel(whole)
    ams = [AdapterModel(p.model, p.elsewhere) for p in parts]
    for cfg in configs:
        am_whole.add_adapter(cfg, seed=seed)
        for am in ams:
            am.add_adapter(cfg, seed=seed)
    for m in [whole] + [p.model for p in parts]:
        m.train()  # adapter dropout on: each stage must draw the whole model's masks

    decoder = whole.get_decoder()
    with routed(am_whole, n, cut):
        want = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    (want * target).sum().backward()

    outs, received = [], None
    for part, am in zip(parts, ams):
        inp = None if received is None else received.detach().requires_grad_(True)
        with routed(am, n, cut):
            out = part.forward(ids, positions, inp)
        outs.append((inp, out))
        received = out
    torch.testing.assert_close(received, want, atol=1e-5, rtol=1e-5)
    grad = None
    for inp, out in reversed(outs):
        if grad is None:
            (out * target).sum().backward()
        else:
            out.backward(grad)
        grad = None if inp is None else inp.grad

    for cfg in configs:
        got = {k: p for am in ams for k, p in am.adapter_parameters(cfg.name).items()}
        full = am_whole.adapter_parameters(cfg.name)
        assert list(got) == list(full), "stage order is the whole model's parameter order, by the same names"
        for k, p in full.items():
            torch.testing.assert_close(got[k].detach(), p.detach(), msg=k)
            torch.testing.assert_close(got[k].grad, p.grad, atol=1e-5, rtol=1e-4, msg=k)


def test_a_stage_holds_only_its_own_weights():
    whole = build("llama")
    total = sum(p.numel() for p in whole.parameters())
    parts = [split_stage(copy.deepcopy(whole), StageSpec(i, 2, r)) for i, r in enumerate([range(0, 2), range(2, 5)])]
    first, last = (sum(p.numel() for p in part.model.parameters()) for part in parts)
    emb = whole.get_input_embeddings().weight.numel()
    norms = sum(p.numel() for n, p in whole.named_parameters() if n == "model.norm.weight")
    # every layer is on exactly one stage; the final norm (tiny) stays on both, a tied embedding too
    tied = emb if whole.config.tie_word_embeddings else 0
    assert first + last == total + norms + tied
    layers = decoder_layers(parts[0].model.get_decoder())
    assert [isinstance(layer, SkippedLayer) for layer in layers] == [False, False, True, True, True]
    assert sorted(parts[0].elsewhere) == sorted(n for n in AdapterModel(whole).linear_names()
                                                if int(n.split(".")[2]) >= 2)


def test_bad_splits_and_models_are_refused_by_name():
    with pytest.raises(ValueError, match="layers 3..5 of a 5-layer model"):
        split_stage(build("llama"), StageSpec(1, 2, range(3, 6)))
    model = build("llama")
    model.config.model_type = "falcon"
    with pytest.raises(ValueError, match="'falcon' cannot be split into pipeline stages"):
        split_stage(model, StageSpec(0, 2, range(0, 2)))
    assert {"llama", "gpt2", "opt", "mixtral"} <= set(STAGEABLE)
    part = split_stage(build("llama"), StageSpec(1, 2, range(3, 5)))
    with pytest.raises(ValueError, match="first stage takes token ids only"):
        part.forward(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None])
    am = AdapterModel(part.model, part.elsewhere)
    with pytest.raises(AdapterError, match="none of its 7 target layers is on this pipeline stage"):
        am.add_adapter(AdapterConfig(name="x", target_modules=r".*layers\.0\..*_proj"))
    with pytest.raises(AdapterError, match="match no linear layer"):
        am.add_adapter(AdapterConfig(name="y", target_modules=["qproj"]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stage_loaded_from_files_equals_the_whole_model_cut(family, tmp_path):
    """Loading only a stage's tensors (other stages' never read) gives what cutting the whole loaded
    model gives: every weight and buffer, tied heads on a last stage included, checkpoint key
    conversions (GPT-NeoX's renamed head, fused experts) applied."""
    whole = build(family, seed=3)
    whole.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    rng = random.Random(family)
    split = random_split(rng)
    for spec in [StageSpec(i, len(split), r) for i, r in enumerate(split)] + [StageSpec(0, 1, range(LAYERS))]:
        loaded = load_stage(tmp_path, copy.deepcopy(config), spec, torch.float32, "eager")
        cut = split_stage(copy.deepcopy(whole), spec).model
        got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
        want = dict(cut.named_parameters()) | dict(cut.named_buffers())
        assert sorted(got) == sorted(want), spec
        for k, v in want.items():
            assert torch.equal(got[k], v), (spec, k)
        assert loaded.stage.spec == spec and sorted(loaded.stage.elsewhere) == sorted(split_stage(
            copy.deepcopy(whole), spec).elsewhere)


MEASURE_LOAD = r"""
import json, re, sys, torch, transformers
from rayft.model.load import load_stage
from rayft.model.stages import StageSpec

def peak():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

path, which = sys.argv[1], sys.argv[2]
config = transformers.AutoConfig.from_pretrained(path)
before = peak()
if which == "whole":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:
    model = load_stage(path, config, StageSpec(1, 8, range(2, 4)), torch.bfloat16)
touched = sum(float(p.float().sum()) for p in model.parameters())  # every weight resident
print(json.dumps(peak() - before))
"""


def test_a_stage_reads_only_its_own_weights_into_memory(tmp_path):
    """A stage's peak memory while loading follows its own share of the layers, not the model's:
    an eighth of a 16-layer model grows the process by less than half what the whole does (by about a third)."""
    import json
    import subprocess
    import sys

    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)

    def grown(which: str) -> int:
        out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(tmp_path), which],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, stage = grown("whole"), grown("stage")
    file_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert whole > 0.9 * file_bytes  # the measure sees the weights
    assert stage < whole / 2, (stage, whole)
