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
