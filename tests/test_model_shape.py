"""The memory model's adapter sizes, read from the real module tree of many model families, against
PEFT's own counts and against what the adapter injection creates. Seconds in all (small configs)."""

import json
import os
import random
import re
import subprocess
import sys

import peft
import pytest
import torch
import transformers

from rayft.adapters import AdapterError, AdapterModel
from rayft.adapters.model import adaptable_linears
from rayft.config import AdapterConfig, BaseModelConfig
from rayft.model.shape import ModelShapeError, model_shape, shape_from_config
from rayft.scheduler.memory import TINYLLAMA_CONFIG, JobShape, ModelShape

# (config class, small kwargs): each family names its linears its own way; GPT-2 and GPT-BigCode
# use transformers' Conv1D (weights stored in × out), which PEFT adapts with fan_in_fan_out.
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=61)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=61)),
    "mistral": (transformers.MistralConfig, dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=1, vocab_size=61)),
    "gemma": (transformers.GemmaConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=61)),
    "phi": (transformers.PhiConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=61)),
    "phi3": (transformers.Phi3Config, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=61,
                                           pad_token_id=0)),
    "opt": (transformers.OPTConfig, dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                         word_embed_proj_dim=32, vocab_size=61, max_position_embeddings=64)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=64)),
    "gpt_bigcode": (transformers.GPTBigCodeConfig, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61,
                                                        n_positions=64)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=61)),
    "falcon": (transformers.FalconConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=61)),
    "bloom": (transformers.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=61)),
    "stablelm": (transformers.StableLmConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=61)),
}


def build(family: str, tied: bool):
    cls, kwargs = FAMILIES[family]
    config = cls(**kwargs, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return config, transformers.AutoModelForCausalLM.from_config(config)


def random_targets(rng: random.Random, names: list[str]):
    """'all-linear', a list of name suffixes, a regex over suffixes, or a regex that also pins the layer."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    some = rng.sample(suffixes, rng.randint(1, len(suffixes)))
    kind = rng.choice(["all", "list", "regex", "layer-regex", "full-name"])
    if kind == "all":
        return "all-linear"
    if kind == "list":
        return some
    if kind == "regex":
        return r".*\.(?:" + "|".join(map(re.escape, some)) + ")"
    if kind == "layer-regex":
        return r".*\.1\..*(?:" + "|".join(map(re.escape, some)) + ")"
    return [rng.choice(names)]  # one exact full module name


def peft_trainable(model, variant: str, r: int, targets) -> int:
    if variant == "vera":
        cfg = peft.VeraConfig(r=r, target_modules=targets)
    else:
        cfg = peft.LoraConfig(r=r, target_modules=targets, use_dora=variant == "dora")
    return peft.get_peft_model(model, cfg).get_nb_trainable_parameters()[0]


CASES = [(seed, sorted(FAMILIES)[seed % len(FAMILIES)]) for seed in range(52)]


@pytest.mark.parametrize("seed, family", CASES)
def test_adapter_params_equal_peft_and_the_injection(seed, family):
    """For random (family, targets, r, variant): the estimate's adapter parameters (from the meta-device
    module tree) == PEFT's trainable parameters == what AdapterModel creates."""
    rng = random.Random(seed)
    tied = rng.random() < 0.5
    config, model = build(family, tied)
    shape = shape_from_config(config, "float32")
    assert shape.params == sum(p.numel() for p in model.parameters())
    names = [n for n, _, _ in shape.linears]
    assert names == list(adaptable_linears(model)), "the meta walk sees the modules of the real model"
    targets = random_targets(rng, names)
    variant = rng.choice(["lora", "dora", "vera"])
    r = rng.choice([1, 2, 4, 8])
    spec = tuple(targets) if isinstance(targets, list) else targets
    estimated = JobShape(rank=r, tokens_per_step=64, max_seq_len=32, variant=variant, targets=spec).adapter_params(shape)
    assert estimated > 0

    am = AdapterModel(build(family, tied)[1])
    am.add_adapter(AdapterConfig(name="a", r=r, alpha=2 * r, variant=variant, target_modules=targets))
    assert sum(p.numel() for p in am.adapter_parameters("a").values()) == estimated
    assert peft_trainable(model, variant, r, targets) == estimated, (family, targets, variant, r)


def test_llama_config_shape_is_the_module_tree():
    """The torch-free Llama shape the simulator and the benchmarks use agrees with the real tree."""
    config = transformers.LlamaConfig(**TINYLLAMA_CONFIG, max_position_embeddings=2048)
    assert ModelShape.from_hf_config(TINYLLAMA_CONFIG) == shape_from_config(config, "bfloat16")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelShape.from_hf_config({"model_type": "gpt2", "n_embd": 8})


PEFT_KEYS = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "magnitude": "lora_magnitude_vector.default.weight"}


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_gpt2_adapter_matches_peft_outputs_and_merges(variant):
    """Conv1D layers (weights in × out) are adapted as the linears they are: the same outputs as
    PEFT's fan_in_fan_out adapter, and merging folds the adapter into the Conv1D's weight exactly."""
    model, ref = build("gpt2", False)[1].eval(), build("gpt2", False)[1].eval()  # eval: no dropout
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = ["c_attn", "c_fc", "c_proj"]
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                   use_dora=variant == "dora"))
    am = AdapterModel(model)
    am.add_adapter(AdapterConfig(name="a", r=4, alpha=8, variant=variant, target_modules=targets))
    with torch.no_grad():
        plain = model(ids).logits
        for k, p in am.adapter_parameters("a").items():
            path, tensor = k.rsplit(".", 1)
            p.mul_(1.2) if tensor == "magnitude" else p.normal_(0, 0.3)
            ref.get_parameter(f"base_model.model.{path}.{PEFT_KEYS[tensor]}").copy_(p)
        with am.use("a", 2):
            ours = model(ids).logits
        theirs = ref(ids).logits
        with am.merged("a"), am.use(None, 2):
            merged = model(ids).logits
        with am.use(None, 2):
            unmerged = model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)
    assert torch.allclose(merged, ours, atol=1e-5) and torch.equal(unmerged, plain)


def test_a_gpt2_adapter_saved_by_rayft_loads_in_peft_with_the_same_logits(tmp_path):
    from rayft.adapters import load_adapter, save_adapter

    am = AdapterModel(build("gpt2", False)[1].eval())
    am.add_adapter(AdapterConfig(name="a", r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in am.adapter_parameters("a").values():
            p.normal_(0, 0.3)
    save_adapter(am, "a", tmp_path / "a")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    back = AdapterModel(build("gpt2", False)[1].eval())
    load_adapter(back, tmp_path / "a", "b")
    with torch.no_grad():
        with am.use("a", 2):
            ours = am.model(ids).logits
        with back.use("b", 2):
            reloaded = back.model(ids).logits
        theirs = peft.PeftModel.from_pretrained(build("gpt2", False)[1].eval(), tmp_path / "a")(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, reloaded, atol=1e-6)


def test_targets_that_match_nothing_or_are_not_a_regex_are_named(tmp_path):
    from rayft.config import ConfigError, load_config

    _, model = build("opt", False)
    am = AdapterModel(model)
    with pytest.raises(AdapterError, match="match no linear layer.*fc1"):
        am.add_adapter(AdapterConfig(name="a", target_modules=["gate_proj"]))
    with pytest.raises(ValueError, match=r"target_modules 'q_proj\(' is not a valid regular expression"):
        JobShape(rank=4, tokens_per_step=8, max_seq_len=8, targets="q_proj(").adapter_params(
            shape_from_config(FAMILIES["opt"][0](**FAMILIES["opt"][1]), "float32"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: {path: x}\nadapters:\n  - name: a\n    target_modules: 'q_proj('\n"
                   "datasets: [{name: d, path: d.jsonl}]\njobs: [{adapter: a, dataset: d, steps: 1}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: adapters.0.target_modules: .*'q_proj\(' is not a valid regular"):
        load_config(bad)


def test_model_shape_reads_a_local_dir_and_a_cached_hub_id(tmp_path):
    """A hub id resolves through the Hugging Face cache (offline); a local dir through its config.json;
    neither: a clear error naming the model."""
    config, _ = build("qwen2", False)
    local = tmp_path / "local"
    config.save_pretrained(local)
    expected = shape_from_config(config, "bfloat16")
    assert model_shape(BaseModelConfig(path=str(local))) == expected

    hub = tmp_path / "hf" / "hub" / "models--someorg--tiny-qwen"
    snap = hub / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config.to_dict()))
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0123abcd")
    # the hub's settings are read at import: a fresh interpreter, offline, with this cache
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("import sys, json; from rayft.config import BaseModelConfig; from rayft.model.shape import model_shape\n"
            "from rayft.model.shape import ModelShapeError\n"
            "try:\n    s = model_shape(BaseModelConfig(path=sys.argv[1], dtype='float32'))\n"
            "    print(json.dumps([s.params, s.linears]))\n"
            "except ModelShapeError as e:\n    print('ERROR', e)\n")
    run = lambda hub_id: subprocess.run([sys.executable, "-c", code, hub_id], env=env, capture_output=True,  # noqa: E731
                                        text=True, timeout=120, check=True).stdout
    cached = json.loads(run("someorg/tiny-qwen"))
    fp32 = shape_from_config(config, "float32")
    assert cached == [fp32.params, [list(x) for x in fp32.linears]]
    missing = run("someorg/not-cached")
    assert missing.startswith("ERROR") and "someorg/not-cached" in missing
    with pytest.raises(ModelShapeError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        model_shape(BaseModelConfig(path=str(tmp_path / "empty")))
