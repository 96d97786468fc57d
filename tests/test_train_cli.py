"""`rayft train` end to end: embedded Ray, a replica actor, PEFT-format adapters, a bad job alone failing."""

import json
from pathlib import Path

import peft
import torch
import yaml
from transformers import AutoModelForCausalLM

from rayft.cli import main


def write_config(tmp_path, tiny_model_dir, task_files, broken: bool) -> Path:
    """Two good jobs, one that diverges (lr 1e6) and one whose checkpoints cannot be written (the
    test puts a file where its directory goes); with `broken`, one more whose data is bad."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = {
        "base_model": {"path": str(tiny_model_dir), "device": "cpu"},
        "adapters": [{"name": "upper", "r": 4}, {"name": "reverse", "r": 4, "variant": "dora"},
                     {"name": "diverge", "r": 4}, {"name": "blocked", "r": 4}],
        "datasets": [
            {"name": "upper", "path": str(task_files["upper"]), "eval_split": 0.1},
            {"name": "reverse", "path": str(task_files["reverse"]), "eval_split": 0.1},
        ],
        "jobs": [
            {"adapter": "upper", "dataset": "upper", "steps": 3, "tokens_per_micro_batch": 128, "max_seq_len": 64},
            {"adapter": "reverse", "dataset": "reverse", "steps": 4, "tokens_per_micro_batch": 128, "max_seq_len": 32},
            {"adapter": "diverge", "dataset": "upper", "steps": 8, "tokens_per_micro_batch": 128, "max_seq_len": 64,
             "optimizer": {"lr": 1e6, "max_grad_norm": None}},
            {"adapter": "blocked", "dataset": "reverse", "steps": 4, "checkpoint_every": 2},
        ],
        "eval": {"max_examples": 4, "max_new_tokens": 4},
    }
    if broken:
        cfg["adapters"].append({"name": "broken"})
        cfg["datasets"].append({"name": "bad", "path": str(bad)})
        cfg["jobs"].append({"adapter": "broken", "dataset": "bad", "steps": 2})
    path = tmp_path / ("broken.yaml" if broken else "run.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_runs_jobs_on_a_replica_and_writes_peft_adapters(tmp_path, tiny_model_dir, task_files, capsys):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "blocked").write_text("a file where the job's checkpoints go")
    config_file = write_config(tmp_path, tiny_model_dir, task_files, broken=False)
    code = main(["train", str(config_file), "--output", str(out), "--steps-per-report", "2"])
    printed = capsys.readouterr().out
    assert code == 1, "jobs failing mid-run make the command exit non-zero"
    assert "rayft: 4 job(s)" in printed, "the summary is printed"
    summary = {j["name"]: j for j in json.loads((out / "summary.json").read_text())}
    assert summary["upper"]["state"] == "done" and summary["upper"]["step"] == 3
    assert summary["reverse"]["state"] == "done" and summary["reverse"]["step"] == 4
    assert summary["diverge"]["state"] == "failed" and "non-finite training at step" in summary["diverge"]["error"]
    assert "job diverge failed: non-finite training at step" in printed
    assert summary["blocked"]["state"] == "failed"
    assert f"job blocked failed: job blocked: cannot write its checkpoint under {out}" in printed
    assert str(out / "checkpoints" / "blocked") in summary["blocked"]["error"]
    assert not (out / "adapters" / "diverge").exists() and not (out / "adapters" / "blocked").exists()
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"upper", "reverse"} and evals["upper"]["examples"] == 4
    for name in ("upper", "reverse"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = peft.PeftModel.from_pretrained(base, out / "adapters" / name)
        assert model.peft_config["default"].use_dora == (name == "reverse")
        assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()

    # running again resumes from the final checkpoints: nothing is retrained; a job with bad data
    # fails at start, naming file and line
    code = main(["train", str(write_config(tmp_path, tiny_model_dir, task_files, broken=True)),
                 "--output", str(out), "--no-eval"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "job upper: resumed from its checkpoint at step 3" in printed
    assert "job broken failed" in printed and "bad.jsonl: line 2: missing field 'output'" in printed


def test_train_on_pipeline_stages_ends_as_on_one_and_fails_the_same_jobs(tmp_path, tiny_model_dir, task_files, capsys):
    import re

    from safetensors.torch import load_file

    config_file = write_config(tmp_path, tiny_model_dir, task_files, broken=False)
    summaries = {}
    for stages in (1, 2):
        out = tmp_path / f"out{stages}"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "blocked").write_text("a file where the job's checkpoints go")
        code = main(["train", str(config_file), "--output", str(out), "--stages", str(stages), "--no-eval"])
        assert code == 1
        summaries[stages] = {j["name"]: j for j in json.loads((out / "summary.json").read_text())}
    printed = capsys.readouterr().out
    assert re.search(r"2 pipeline stages \((STRICT_PACK|PACK)\), decoder layers 0-\d, \d-3", printed)
    for name, one in summaries[1].items():
        two = summaries[2][name]
        assert (two["state"], two["step"]) == (one["state"], one["step"]), name
        if one["state"] == "failed":  # the same failure at the same step, on every stage alike
            assert two["error"].split(":")[0] == one["error"].split(":")[0], (one["error"], two["error"])
    assert "non-finite training at step" in summaries[2]["diverge"]["error"]
    assert "cannot write its checkpoint" in summaries[2]["blocked"]["error"]
    for name in ("upper", "reverse"):
        a = load_file(str(tmp_path / "out1" / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "out2" / "adapters" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) < 1e-4, (name, k)
    assert not (tmp_path / "out2" / "adapters" / "diverge").exists()
