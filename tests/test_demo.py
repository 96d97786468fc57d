"""The README's first command, as a user runs it: the demo's adapters each learn their own task."""

import json
from pathlib import Path

import yaml

from rayft.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_demo_adapters_beat_base_and_majority_guess(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["base_model"]["path"] = str(tmp_path / "tiny")  # built from scratch, as on a fresh clone
    for ds in cfg["datasets"]:
        ds["path"] = str(ROOT / "configs" / ds["path"])
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["train", str(path), "--output", str(tmp_path / "out"), "--steps-per-report", "20"]) == 0
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(results) == {"length", "earliest", "latest"}
    for name, r in results.items():
        assert r["examples"] >= 50
        # each adapter does its own task: far above the base and above always giving the usual answer
        assert r["adapter_exact_match"] >= r["base_exact_match"] + 0.5, (name, r)
        assert r["adapter_exact_match"] >= r["majority_exact_match"] + 0.3, (name, r)
        assert (tmp_path / "out" / "adapters" / name / "adapter_model.safetensors").is_file()


def _module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_model_demo_data_is_what_its_generator_writes(tmp_path):
    _module(ROOT / "configs" / "smollm2" / "make_data.py").main(tmp_path)
    for task in ("reverse", "surname", "rotate"):
        assert (tmp_path / f"{task}.jsonl").read_text() == (ROOT / "configs" / "smollm2" / f"{task}.jsonl").read_text()


def test_real_model_demo_runs_shortened(smollm2, tmp_path):
    """configs/smollm2.yaml as shipped (three adapters, its template, rows and lengths) on the real base,
    cut to a few steps: every job trains through a checkpoint, and the base fails every task zero-shot."""
    cfg = yaml.safe_load((ROOT / "configs" / "smollm2.yaml").read_text())
    cfg["base_model"]["path"] = str(smollm2[2])
    for ds in cfg["datasets"]:
        ds["path"] = str(ROOT / "configs" / ds["path"])
    for job in cfg["jobs"]:
        job.update(steps=3, checkpoint_every=2)
    cfg["eval"] = {**cfg["eval"], "max_examples": 6}
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["train", str(path), "--output", str(tmp_path / "out"), "--steps-per-report", "1"]) == 0
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(results) == {"reverse", "surname", "rotate"}
    for name, r in results.items():
        assert r["examples"] == 6 and r["base_exact_match"] == 0.0, (name, r)
        assert (tmp_path / "out" / "adapters" / name / "adapter_model.safetensors").is_file()
