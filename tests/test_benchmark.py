"""Smoke test of benchmarks/fused_vs_peft.py: it runs all three measurements and reports them (no timing asserts)."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_vs_peft.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fused_vs_peft", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fused_vs_peft_smoke(bench, capsys, tmp_path):
    out = bench.main([
        "--shape", "tiny", "--device", "cpu", "--jobs", "2", "--micro-batch", "2",
        "--steps", "1", "--warmup", "1", "--seq-len", "32", "--json", str(tmp_path / "r.json"),
    ])
    printed = capsys.readouterr().out

    tps = out["tokens_per_s"]
    assert set(tps) == {"fused", "peft", "frozen"}
    for name, v in tps.items():
        assert math.isfinite(v) and v > 0, name
        r = out["results"][name]
        assert r["tokens"] == 2 * 2 * 32  # one timed step of K*B rows of seq_len tokens, all three alike
        assert math.isfinite(r["loss"])
    assert out["fused_over_peft"] == pytest.approx(tps["fused"] / tps["peft"])
    assert out["fused_over_frozen"] == pytest.approx(tps["fused"] / tps["frozen"])
    assert out["results"]["fused"]["adapter_dtype"] == "torch.float32"

    assert "tokens/s" in printed and "fused / peft" in printed and "fused / frozen" in printed
    header, row = out["markdown"]
    assert header in printed and row in printed
    assert row.count("|") == header.count("|")
    assert (tmp_path / "r.json").is_file()


def test_memory_model_script_runs_its_grid_and_fits_only_measured_peaks(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("memory_model", SCRIPT.with_name("memory_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--jobs", "1", "2", "--rows", "1", "--seq-len", "16", "--rank", "4",
                    "--loss-fraction", "1.0", "0.25", "--json", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert len(out["points"]) == 4 and all(p["peak"] is None for p in out["points"])
    assert out["coefficients"] is None and "no peaks measured" in printed
    assert "| 2 | 1 | 16 | 4 | 25% | - |" in printed


def test_serve_load_script_measures_each_load_and_a_hot_load(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT.with_name("serve_load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--adapters", "1", "2", "--requests", "8", "--concurrency", "4",
                    "--prompt-len", "8", "--max-tokens", "4", "--burst", "12", "--compressed", "8",
                    "--components", "2"])
    printed = capsys.readouterr().out
    zoo = "8 adapters of one compressed store (k=2)"
    assert set(out["results"]) == {"base", "1 adapters", "2 adapters", "2 adapters, 12 in flight", zoo}
    for name, r in out["results"].items():
        assert r["requests"] == (12 if "in flight" in name else 8), name
        assert r["tokens_per_s"] > 0 and 0 < r["p50_s"] <= r["p99_s"]
    assert 0 < out["hot_load"]["server_load_s"] <= out["hot_load"]["request_s"]
    assert "| 2 adapters |" in printed and "hot load of one r=16 adapter" in printed
    # memory read from the engine: 8 adapters in a k=2 basis (2 components and a mean: 3 adapters'
    # worth, and loadings) hold less than the stacks of 2 plain adapters (4 slots)
    plain, store = out["adapter_bytes"]["2 plain adapters (LoRA stacks)"], out["adapter_bytes"][zoo]
    assert 0 < store < plain and f"| {zoo} |" in printed


def test_serve_load_serves_the_real_smollm2_base_built_from_its_gguf(smollm2, tmp_path, monkeypatch, capsys):
    from rayft.model.gguf import gguf_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = gguf_cache_dir(smollm2[0])  # where base_model: {gguf: FILE} builds it: the session's build, linked
    cached.parent.mkdir(parents=True)
    cached.symlink_to(smollm2[2], target_is_directory=True)
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT.with_name("serve_load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--shape", "smollm2", "--adapters", "1", "--requests", "2",
                    "--concurrency", "2", "--prompt-len", "5", "--max-tokens", "2", "--burst", "0",
                    "--compressed", "0"])
    printed = capsys.readouterr().out
    assert set(out["results"]) == {"base", "1 adapters"} and out["shape"] == "smollm2"
    for name, r in out["results"].items():
        assert r["prompt_tokens"] == 5, name  # a prompt unit is one token of SmolLM2's tokenizer
        assert r["tokens_per_s"] > 0 and 0 < r["completion_tokens"] <= 2, name
    assert "· smollm2 float32 ·" in printed and "prompt 5 tokens" in printed and "| 1 adapters |" in printed

def test_fused_vs_peft_mixed_lengths_carry_no_padding(bench, capsys):
    """Jobs of 16-, 32- and 64-token rows: every measurement runs the same tokens, the fused step
    pays no padding where a rectangular batch of those rows would pad over a third of it."""
    out = bench.main(["--shape", "tiny", "--device", "cpu", "--jobs", "3", "--micro-batch", "1",
                      "--steps", "1", "--warmup", "1", "--seq-lens", "16,32,64"])
    printed = capsys.readouterr().out
    for name in ("fused", "peft", "frozen"):
        assert out["results"][name]["tokens"] == 16 + 32 + 64, name
    assert out["results"]["fused"]["padding"] == 0.0
    assert "a rectangular batch: 41.7%" in printed
