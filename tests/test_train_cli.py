"""`rayft train` end to end: embedded Ray, a replica actor, PEFT-format adapters, a bad job alone failing."""

import json

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rayft.cli import main


@pytest.fixture
def config_file(tmp_path, tiny_model_dir, task_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = {
        "base_model": {"path": str(tiny_model_dir), "device": "cpu"},
        "adapters": [{"name": "upper", "r": 4}, {"name": "reverse", "r": 4, "variant": "dora"}, {"name": "broken"}],
        "datasets": [
            {"name": "upper", "path": str(task_files["upper"]), "eval_split": 0.1},
            {"name": "reverse", "path": str(task_files["reverse"]), "eval_split": 0.1},
            {"name": "bad", "path": str(bad)},
        ],
        "jobs": [
            {"adapter": "upper", "dataset": "upper", "steps": 3, "tokens_per_micro_batch": 128, "max_seq_len": 64},
            {"adapter": "reverse", "dataset": "reverse", "steps": 4, "tokens_per_micro_batch": 128, "max_seq_len": 32},
            {"adapter": "broken", "dataset": "bad", "steps": 2},
        ],
        "eval": {"max_examples": 4, "max_new_tokens": 4},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_runs_jobs_on_a_replica_and_writes_peft_adapters(config_file, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code = main(["train", str(config_file), "--output", str(out), "--steps-per-report", "2"])
    printed = capsys.readouterr().out
    assert code == 1, "a failed job makes the command exit non-zero"
    assert "job broken failed" in printed and "bad.jsonl: line 2: missing field 'output'" in printed
    summary = {j["name"]: j for j in json.loads((out / "summary.json").read_text())}
    assert summary["upper"]["state"] == "done" and summary["upper"]["step"] == 3
    assert summary["reverse"]["state"] == "done" and summary["reverse"]["step"] == 4
    assert summary["broken"]["state"] == "failed"
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"upper", "reverse"} and evals["upper"]["examples"] == 4
    for name in ("upper", "reverse"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = peft.PeftModel.from_pretrained(base, out / "adapters" / name)
        assert model.peft_config["default"].use_dora == (name == "reverse")
        assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()

    # running again resumes from the final checkpoints: nothing is retrained
    code = main(["train", str(config_file), "--output", str(out), "--no-eval"])
    printed = capsys.readouterr().out
    assert "job upper: resumed from its checkpoint at step 3" in printed
