"""`rayft train` with stdout a pipe (a log, no terminal): progress lines per job while it runs."""

import random
import re
import subprocess
import sys

import yaml

from rayft import cli

LINE = re.compile(r"^(?P<job>[\w.-]+): (?P<state>\w+) step (?P<step>\d+)/(?P<total>\d+|\?) "
                  r"loss (?P<loss>[\d.]+|-) (?P<tps>[\d,]+|-) tok/s")


def test_log_progress_prints_each_change_once_over_generated_runs(capsys, monkeypatch):
    """Over generated step sequences: a job's first report, every state change and every 10-step
    crossing gives a line; a report that changes none of them gives none (inside the time limit)."""
    assert not cli.console.is_terminal  # pytest captures stdout: the no-terminal path
    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    for seed in range(40):
        rng = random.Random(seed)
        logged: dict = {}
        expected, last_key = 0, {}
        for _ in range(rng.randint(5, 60)):
            name = rng.choice(["a", "b", "c"])
            step = rng.randint(0, 100)
            state = rng.choice(["running", "running", "running", "done"])
            clock[0] += rng.choice([0.1, 1.0, 5.0])
            key = (state, step // 10)
            due = name not in last_key or last_key[name][0] != key or clock[0] - last_key[name][1] >= 30.0
            if due:
                expected += 1
                last_key[name] = (key, clock[0])
            cli._log_progress(logged, name, state, step, 100, {"loss": "1.234", "tps": "1,000"})
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == expected, f"seed {seed}"
        assert all(LINE.match(line) for line in lines), lines


def test_train_to_a_pipe_prints_progress_lines_per_job_during_the_run(tmp_path, tiny_model_dir, task_files):
    cfg = {
        "base_model": {"path": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        "adapters": [{"name": "upper", "r": 4}, {"name": "reverse", "r": 4}],
        "datasets": [{"name": "upper", "path": str(task_files["upper"])},
                     {"name": "reverse", "path": str(task_files["reverse"])}],
        "jobs": [{"adapter": n, "dataset": n, "steps": 30, "tokens_per_micro_batch": 128, "max_seq_len": 64}
                 for n in ("upper", "reverse")],
    }
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "rayft.cli", "train", str(config_file), "--output",
                             str(tmp_path / "out"), "--steps-per-report", "2", "--no-eval"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []  # (line, was the command still running when it arrived)
    try:
        for line in proc.stdout:
            seen.append((line.rstrip("\n"), proc.poll() is None))
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    progress = [(LINE.match(line), alive) for line, alive in seen if LINE.match(line)]
    summary_at = next(i for i, (line, _) in enumerate(seen) if "rayft: 2 job(s)" in line)
    for job in ("upper", "reverse"):
        mine = [(m, alive) for m, alive in progress if m["job"] == job]
        steps = [int(m["step"]) for m, _ in mine]
        assert len(mine) >= 3 and steps == sorted(steps), (job, steps)
        assert any(alive and m["state"] == "running" and m["loss"] != "-" and m["tps"] != "-" for m, alive in mine), \
            f"{job}: no progress line with a loss and tokens/s arrived while the run was going"
        assert mine[-1][0]["state"] == "done" and mine[-1][0]["step"] == "30" and mine[-1][0]["total"] == "30"
    first_progress = next(i for i, (line, _) in enumerate(seen) if LINE.match(line))
    assert first_progress < summary_at, "progress comes before the summary, not only at the end"
