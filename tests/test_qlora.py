"""A quantized base (QLoRA) on the tiny model, on the CPU: bitsandbytes' int8 and torchao's NF4 (what
nf4 loads as on the CPU, where bitsandbytes' 4-bit layers do not train). Adapters train as on a
full-precision twin holding the very matrices the quantized layers apply (LoRA and DoRA: DoRA's norms
from the dequantised weight, not the packed storage), save as ordinary PEFT adapters that PEFT
applies to the same quantized base with the same logits; what cannot run is refused by name; the
memory model counts the quantized weights."""

import os
import shutil

import pytest
import torch
from conftest import run_config

from rayft.config import ConfigError, RunConfig, parse_config

bnb = pytest.importorskip("bitsandbytes")

# RAYFT_TEST_DEVICE=cuda runs these on a GPU (benchmarks/gpu_checks.sh): nf4 and fp4 through bitsandbytes
DEVICE = os.environ.get("RAYFT_TEST_DEVICE", "cpu")
QUANTIZATIONS = ("int8", "nf4") + (("fp4",) if DEVICE == "cuda" else ())


def quantized(cfg: RunConfig, **base) -> RunConfig:
    d = cfg.model_dump()
    d["base_model"].update(device=DEVICE, **base)
    return RunConfig.model_validate(d)


def quantized_base(model_dir, quantization: str):
    """The base as rayft loads it for `quantization` (bitsandbytes' int8; torchao's NF4 on the CPU)."""
    from rayft.config import BaseModelConfig
    from rayft.model.load import load_base_model

    return load_base_model(BaseModelConfig(path=str(model_dir), dtype="float32", device=DEVICE,
                                           quantization=quantization))[0]


@pytest.fixture(scope="module")
def twins(tiny_model_dir, tmp_path_factory):
    """The tiny model at full precision with every linear layer (the head aside) holding the matrix
    its quantized counterpart applies, for each quantization."""
    from transformers import AutoModelForCausalLM

    from rayft.adapters.dense import dense_weight

    out = {}
    for quantization in QUANTIZATIONS:
        q = quantized_base(tiny_model_dir, quantization)
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        head = full.get_output_embeddings()
        with torch.no_grad():
            for name, m in full.named_modules():
                if isinstance(m, torch.nn.Linear) and m is not head:
                    m.weight.copy_(dense_weight(q.get_submodule(name)).cpu())
        out[quantization] = tmp_path_factory.mktemp("twin") / quantization
        full.save_pretrained(out[quantization])
        for f in tiny_model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out[quantization])
    return out


LAYER = {"int8": ("Linear8bitLt", torch.int8), "nf4": ("NF4Linear" if DEVICE == "cpu" else "Linear4bit", None),
         "fp4": ("Linear4bit", None)}
CASES = [(q, v) for q in QUANTIZATIONS for v in ("lora", "dora")]


@pytest.mark.parametrize("quantization,variant", CASES)
def test_adapters_on_a_quantized_base_train_as_on_its_full_precision_twin(quantization, variant, tiny_model_dir,
                                                                        twins, task_files, tmp_path):
    from rayft.train.trainer import Trainer

    jobs = {"q": {"task": "upper", "steps": 4, "optimizer": {"lr": 1e-2},
                  "adapter": {"variant": variant, "target_modules": "all-linear"}}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    on_q = Trainer(quantized(cfg, quantization=quantization), tmp_path / quantization)
    on_twin = Trainer(quantized(cfg, path=str(twins[quantization])), tmp_path / "twin")
    layer = on_q.am.model.model.layers[0].self_attn.q_proj.base
    kind, dtype = LAYER[quantization]
    assert type(layer).__name__ == kind and (dtype is None or layer.weight.dtype == dtype)
    on_q.run()
    on_twin.run()
    got, want = ([r.loss for r in t.jobs["q"].history] for t in (on_q, on_twin))
    assert got == pytest.approx(want, rel=1e-3)
    assert want[-1] < want[0] - 0.3, "the adapter learns"


@pytest.mark.parametrize("quantization,variant", CASES)
def test_a_qlora_adapter_is_an_ordinary_peft_adapter_on_the_same_quantized_base(quantization, variant, tiny_model_dir,
                                                                               twins, task_files, tmp_path):
    """PEFT applies the saved adapter to the quantized base with rayft's logits. (PEFT's DoRA cannot
    read torchao's NF4 weight, calling its `dequantize()` without arguments: for nf4 DoRA, PEFT runs
    on the full-precision twin, the same function.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.train.trainer import Trainer

    jobs = {"q": {"task": "upper", "steps": 3, "optimizer": {"lr": 1e-2},
                  "adapter": {"variant": variant, "target_modules": "all-linear"}}}
    t = Trainer(quantized(run_config(tiny_model_dir, task_files, jobs), quantization=quantization), tmp_path / "out")
    t.run()
    if (quantization, variant, DEVICE) == ("nf4", "dora", "cpu"):
        base = AutoModelForCausalLM.from_pretrained(twins["nf4"], dtype=torch.float32)
    else:
        base = quantized_base(tiny_model_dir, quantization)
    peft = PeftModel.from_pretrained(base, tmp_path / "out" / "adapters" / "q")
    peft.eval()
    ids = torch.randint(3, 60, (2, 12), device=DEVICE)
    t.am.model.eval()
    with torch.no_grad():
        want = peft(ids).logits
        with t.am.use("q", rows=2):
            got = t.am.model(ids).logits
        untuned = t.am.model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - untuned).abs().max() > 1e-3, "the adapter changes the output"


def test_what_a_quantized_base_cannot_do_is_refused_by_name(tiny_model_dir, task_files, tmp_path):
    from rayft.adapters.dense import is_quantized
    from rayft.model.quantized import QuantizationError
    from rayft.train.trainer import Trainer

    base = {"base_model": {"path": "m"}, "adapters": [{"name": "a"}], "datasets": [{"name": "d", "path": "d.jsonl"}],
            "jobs": [{"adapter": "a", "dataset": "d", "steps": 1}]}
    for over, problem in [({"double_quant": True}, "apply to a quantized base: set quantization"),
                          ({"quantization": "int8", "compute_dtype": "bfloat16"}, "not int8"),
                          ({"quantization": "nf4", "compile": True}, "compile: not supported on a quantized base")]:
        with pytest.raises(ConfigError, match=problem):
            parse_config({**base, "base_model": {"path": "m", **over}})
    cfg = run_config(tiny_model_dir, task_files, {"q": {"task": "upper"}})
    if DEVICE == "cpu":
        with pytest.raises(QuantizationError, match="fp4 on the CPU: bitsandbytes' 4-bit layers do not train there"):
            Trainer(quantized(cfg, quantization="fp4"), tmp_path / "fp4")
    t = Trainer(quantized(cfg, quantization="int8"), tmp_path / "int8")
    layer = t.am.model.model.layers[0].mlp.up_proj
    assert is_quantized(layer.base)
    with pytest.raises(RuntimeError, match="cannot take an adapter folded into its weights"):
        with t.am.merged("q"):
            pass


def test_the_memory_model_counts_quantized_weights(tiny_model_dir):
    from rayft.config import BaseModelConfig
    from rayft.model.shape import model_shape

    full = model_shape(BaseModelConfig(path=str(tiny_model_dir), dtype="bfloat16"))
    linear = sum(a * b for _, a, b in full.linears)
    for quantization, double, per_weight in [("int8", False, 1.0), ("nf4", False, 0.5625),
                                             ("nf4", True, 0.5 + 1 / 64 + 4 / 16384)]:
        q = model_shape(BaseModelConfig(path=str(tiny_model_dir), dtype="bfloat16", quantization=quantization,
                                        double_quant=double))
        assert q.weight_bytes == int((full.params - linear) * 2 + linear * per_weight)
        assert q.weight_bytes < full.weight_bytes


def test_a_preference_adapter_and_a_qlora_one_are_served_on_the_quantized_base(tiny_model_dir, task_files, tmp_path):
    """Serving on the 4-bit base is the Serve config's `base_model.quantization`: over real HTTP,
    a DPO adapter and an SFT adapter trained on that base answer with the greedy text the training
    side's own model gives (the same quantized base, the same adapters)."""
    import ray
    from conftest import free_port
    from ray import serve
    from test_serve import call

    from rayft.config import ServeConfig
    from rayft.serving.server import build
    from rayft.train.evaluate import greedy_generate
    from rayft.train.trainer import Trainer

    jobs = {"pref": {"task": "prefer", "objective": "dpo", "steps": 3}, "sft": {"task": "upper", "steps": 3,
                                                                          "optimizer": {"lr": 5e-2}}}
    cfg = quantized(run_config(tiny_model_dir, task_files, jobs), quantization="nf4")
    t = Trainer(cfg, tmp_path / "out")
    t.run()
    prompt = "upper abc\n### Answer:\n"
    ids = t.tokenizer(prompt)["input_ids"]
    want = {name: greedy_generate(t.am, t.tokenizer, [ids], name, 6)[0] for name in jobs}
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(ServeConfig(store=tmp_path / "out", base_model=cfg.base_model)), name="rayft", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for name in jobs:
            code, body = call(f"{url}/v1/completions", "POST", {"model": name, "prompt": prompt, "max_tokens": 6,
                                                               "temperature": 0})
            assert code == 200, body
            assert body["choices"][0]["text"] == want[name], name
    finally:
        serve.shutdown()
        ray.shutdown()


def test_rayft_plan_counts_a_1b_model_s_weights_at_4_bits(tmp_path, capsys):
    import json

    import yaml

    from rayft.cli import main
    from rayft.scheduler.memory import GIB, TINYLLAMA_CONFIG

    model = tmp_path / "tinyllama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    **TINYLLAMA_CONFIG}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    shown = {}
    for quantization in (None, "nf4"):
        base = {"path": str(model), "dtype": "bfloat16", **({"quantization": quantization} if quantization else {})}
        cfg = {"base_model": base, "adapters": [{"name": "a", "r": 16}], "datasets": [{"name": "d", "path": str(data)}],
               "jobs": [{"adapter": "a", "dataset": "d", "steps": 1}]}
        path = tmp_path / f"{quantization}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["plan", str(path)]) == 0
        out = capsys.readouterr().out
        shown[quantization] = float(out.split("base weights ")[1].split(" GiB")[0])
        assert ("linear layers in nf4" in out) == (quantization == "nf4")
    assert shown[None] == pytest.approx(1_100_048_384 * 2 / GIB, abs=0.01)  # TinyLlama-1.1B in bf16
    linear = 22 * (2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632)
    assert shown["nf4"] == pytest.approx((1_100_048_384 - linear) * 2 / GIB + linear * 0.5625 / GIB, abs=0.01)
