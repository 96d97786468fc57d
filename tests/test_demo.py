"""The README's first command, as a user runs it: the demo's adapters each learn their own task."""

import json
from pathlib import Path

import yaml

from rayft.cli import main

ROOT = Path(__file__).resolve().parent.parent


def train_shipped(name: str, tmp_path, model_path, report_every: int, change=lambda cfg: None) -> dict:
    """configs/<name>.yaml as shipped, on the given base (`change` may edit it), run by `rayft train`
    in tmp_path; returns its eval.json."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    cfg["base_model"]["path"] = str(model_path)
    for ds in cfg["datasets"]:
        ds["path"] = str(ROOT / "configs" / ds["path"])
    change(cfg)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["train", str(path), "--output", str(tmp_path / "out"), "--steps-per-report", str(report_every)]
    assert main(args) == 0
    return json.loads((tmp_path / "out" / "eval.json").read_text())


def test_demo_adapters_beat_base_and_majority_guess(tmp_path):
    results = train_shipped("demo", tmp_path, tmp_path / "tiny", 20)  # the base built from scratch, as on a fresh clone
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
    def shorten(cfg):
        for job in cfg["jobs"]:  # a checkpoint after the first step, then the last (about 7 s a step on 2 cores)
            job.update(steps=2, checkpoint_every=1)
        cfg["eval"] = {**cfg["eval"], "max_examples": 6}

    results = train_shipped("smollm2", tmp_path, smollm2[2], 1, shorten)
    assert set(results) == {"reverse", "surname", "rotate"}
    for name, r in results.items():
        assert r["examples"] == 6 and r["base_exact_match"] == 0.0, (name, r)
        assert (tmp_path / "out" / "adapters" / name / "adapter_model.safetensors").is_file()


def test_preference_demo_prefers_the_chosen_answers_where_the_base_does_not(tmp_path):
    """configs/preference.yaml, shortened: its DPO adapter, trained beside an SFT one, scores the
    chosen answers above the rejected ones on held-out pairs; the base does about as a coin."""
    def shorter(cfg):
        for job in cfg["jobs"]:
            job["steps"] = 40

    results = train_shipped("preference", tmp_path, tmp_path / "tiny", 20, shorter)
    summary = {j["name"]: j for j in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert summary["prefer-latest"]["metrics"]["rewards/accuracies"] >= 0.5  # TRL's names, at its last step
    assert summary["earliest"]["metrics"] == {}
    r = results["prefer-latest"]
    assert r["examples"] >= 50
    assert r["adapter_preference_accuracy"] >= 0.9 and r["base_preference_accuracy"] <= 0.6, r
    assert "adapter_exact_match" in results["earliest"]


def test_the_demo_data_is_what_its_generator_writes(tmp_path):
    _module(ROOT / "configs" / "demo" / "make_data.py").main(tmp_path)
    for name in ("length", "earliest", "latest", "prefer_latest"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (ROOT / "configs" / "demo" / f"{name}.jsonl").read_text()
