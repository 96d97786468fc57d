"""`rayft validate` reads every job's data as `rayft train` would, and says what train would."""

import json
import random

import pytest
import yaml

from rayft.cli import main
from rayft.config import load_config
from rayft.data import encode_examples, load_splits
from rayft.train.trainer import Trainer


def good_rows(rng, n):
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return [{"instruction": "upper", "input": w, "output": w.upper()} for w in words]


def corrupt(rng, kind, rows):
    """(file text, job overrides, what the error must say) for one kind of bad dataset."""
    lines = [json.dumps(r) for r in rows]
    i = rng.randrange(len(lines))
    where = f"line {i + 1}: "
    if kind == "malformed json":
        lines[i] = lines[i][: rng.randint(1, len(lines[i]) - 1)]
        return lines, {}, where + "malformed JSON"
    if kind == "missing field":
        lines[i] = json.dumps({k: v for k, v in rows[i].items() if k != "output"})
        return lines, {}, where + "missing field 'output'"
    if kind == "wrong type":
        lines[i] = json.dumps({**rows[i], "output": rng.randint(0, 99)})
        return lines, {}, where + "field 'output' must be a string, got int"
    if kind == "not an object":
        lines[i] = json.dumps([rows[i]["input"]])
        return lines, {}, where + "expected an object, got list"
    if kind == "mixed formats":  # past the first row, which sets the dataset's format
        i = rng.randrange(1, len(lines))
        where = f"line {i + 1}: "
        lines[i] = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
        return lines, {}, where + "mixed formats"
    if kind == "empty":
        return [], {}, "dataset is empty"
    if kind == "all too long, skipped":
        return lines, {"max_seq_len": 8, "tokens_per_micro_batch": 16, "long_examples": "skip"}, "no examples left"
    if kind == "answers truncated away":
        return lines, {"max_seq_len": 12, "tokens_per_micro_batch": 24}, "no loss tokens"
    raise AssertionError(kind)


KINDS = ["malformed json", "missing field", "wrong type", "not an object", "mixed formats", "empty",
         "all too long, skipped", "answers truncated away"]


def write_config(tmp_path, tiny_model_dir, datasets: dict, jobs: dict):
    cfg = {
        "base_model": {"path": str(tiny_model_dir), "device": "cpu"},
        "adapters": [{"name": n, "r": 4} for n in jobs],
        "datasets": [{"name": n, "path": str(p), "eval_split": 0.1} for n, p in datasets.items()],
        "jobs": [{"adapter": n, "dataset": n, "steps": 3, "tokens_per_micro_batch": 128, "max_seq_len": 64, **over}
                 for n, over in jobs.items()],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("seed", range(32))
def test_validate_refuses_what_train_would_refuse_naming_file_and_line(seed, tmp_path, tiny_model_dir, capsys):
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    rows = good_rows(rng, rng.randint(12, 40))
    lines, over, says = corrupt(rng, kind, rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in lines))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in good_rows(rng, 30)))
    path = write_config(tmp_path, tiny_model_dir, {"good": good, "bad": bad}, {"good": {}, "bad": over})

    assert main(["validate", str(path)]) != 0
    printed = capsys.readouterr().out
    assert f"{bad}: {says}" in printed, (kind, printed)
    assert "1 of 2 job(s) would fail: bad" in printed
    # the same words as train: one code path
    t = Trainer(load_config(path), tmp_path / "out")
    assert t.status["bad"].state == "failed" and t.status["bad"].error in printed
    assert t.status["good"].state == "running"


@pytest.mark.parametrize("seed", range(16))
def test_validate_reports_each_job_as_train_will_use_it(seed, tmp_path, tiny_model_dir, capsys):
    rng = random.Random(1000 + seed)
    datasets, jobs = {}, {}
    for n in ("a", "b"):
        datasets[n] = tmp_path / f"{n}.jsonl"
        datasets[n].write_text("".join(json.dumps(r) + "\n" for r in good_rows(rng, rng.randint(20, 60))))
        # prompts are 23-27 tokens: from no answer left to every example whole
        jobs[n] = {"max_seq_len": rng.choice([24, 25, 26, 27, 30, 64]), "long_examples": rng.choice(["truncate", "skip"])}
        jobs[n]["tokens_per_micro_batch"] = jobs[n]["max_seq_len"] * 2
        if rng.random() < 0.5:
            jobs[n].update(steps=None, epochs=rng.choice([1, 2]))
    path = write_config(tmp_path, tiny_model_dir, datasets, jobs)
    code = main(["validate", str(path)])
    printed = capsys.readouterr().out
    t = Trainer(load_config(path), tmp_path / "out")
    failed = [n for n, st in t.status.items() if st.state == "failed"]
    assert code == (2 if failed else 0), printed
    for n in jobs:
        st = t.status[n]
        if st.state == "failed":
            assert st.error in printed
            continue
        r = t.jobs[n].packer.report
        train, held = load_splits(load_config(path).dataset(n))
        assert len(encode_examples(train, t.tokenizer)) == r.examples
        # the job's row: examples, eval, truncated, skipped, no answer left, loss tokens, steps
        cells = [str(r.examples), str(len(held)), str(r.truncated), str(r.skipped), str(r.no_loss),
                 f"{r.loss_tokens:,}", str(t.jobs[n].total_steps)]
        row = next(line for line in printed.splitlines() if line.strip("│┃ ").startswith(n + " "))
        assert [c.strip() for c in row.split("│")[3:10]] == cells, row
        for w in st.warnings:
            assert f"job {n}: {w}" in printed
    if not failed:
        assert f"ok {path}" in printed
