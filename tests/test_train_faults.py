"""Faults stay with their job and are never reported as success: non-finite training, failed saves,
out-of-memory steps (through `rayft train`'s loop), unsafe checkpoints, file modes."""

import errno
import json
import math
import os
import random
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

from rayft import cli
from rayft.cluster.replica import ReplicaWorker
from rayft.train import checkpoint as ckpt_mod
from rayft.train import trainer as trainer_mod
from rayft.train.trainer import Trainer

TASKS = ("upper", "reverse", "double")


def weights(t, name):
    return {k: v.detach().clone() for k, v in t.am.adapter_state(t.jobs[name].adapter.name).items()}


def losses(t, name):
    return [r.loss for r in t.jobs[name].history]


def random_job(rng: random.Random, dropout: bool = True) -> dict:
    """A job of random shape: variant, rank, row length and count, optimizer, accumulation, dropout."""
    variant = rng.choice(["lora", "dora", "vera"])
    seq = rng.choice([48, 64])
    opt = {"name": rng.choice(["adamw", "sgd"]), "lr": rng.choice([3e-3, 1e-2]),
           "grad_accumulation": rng.choice([1, 2]), "max_grad_norm": rng.choice([None, 1.0])}
    if opt["name"] == "sgd":
        opt["momentum"] = rng.choice([0.0, 0.9])
    return {"task": rng.choice(TASKS), "steps": rng.randint(3, 5), "max_seq_len": seq,
            "tokens_per_micro_batch": seq * rng.choice([1, 2]), "checkpoint_every": rng.choice([None, 1, 2]),
            "adapter": {"variant": variant, "r": 16 if variant == "vera" else rng.choice([2, 4]),
                        "dropout": rng.choice([0.0, 0.1]) if dropout else 0.0},
            "optimizer": opt}


def finite_checkpoints(out: Path, job: str) -> list[int]:
    """Steps of the job's checkpoints on disk, each checked to hold only finite weights."""
    steps = []
    for d in sorted((out / "checkpoints" / job).glob("ckpt-*")):
        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(d / "adapter.safetensors")).values()), d
        steps.append(int(d.name.split("-")[1]))
    return steps


# ---- non-finite training ---------------------------------------------------------------------------

def poison(t: Trainer, name: str, how: str, at_step: int):
    """Make job `name`'s step `at_step` non-finite: a NaN weight before it (its loss is NaN), an
    infinite gradient (finite loss), or a learning rate of 1e6 from the start (it diverges)."""
    job = t.jobs[name]
    param = job.parameters[0]
    if how == "grad":  # into the gradient the backward left, before the job clips and steps
        real_after = job.after_micro_batch

        def after_micro_batch(*args):
            if job.step == at_step - 1 and param.grad is not None:
                param.grad.mul_(math.inf)
            return real_after(*args)
        job.after_micro_batch = after_micro_batch
    elif how == "weight":
        real = t.step

        def step():
            if name in t.jobs and job.step == at_step - 1:
                with torch.no_grad():
                    param.view(-1)[0] = math.nan
            return real()
        t.step = step


@pytest.mark.parametrize("seed", range(24))
def test_a_non_finite_job_stops_alone_unsaved_and_unchanged_and_its_neighbours_equal_their_alone_runs(
        seed, tiny_model_dir, task_files, tmp_path):
    rng = random.Random(seed)
    how = ("grad", "weight", "lr")[seed % 3]
    partners = {f"p{i}": random_job(rng) for i in range(rng.randint(1, 2))}
    bad = random_job(rng)
    bad["steps"] = 8
    if how == "lr":  # diverges within a few steps
        bad["optimizer"] = {"name": "adamw", "lr": 1e6, "max_grad_norm": None,
                            "grad_accumulation": bad["optimizer"]["grad_accumulation"]}
    at_step = rng.randint(1, 6)
    jobs = {**partners, "bad": bad}
    out = tmp_path / "fused"
    t = Trainer(run_config(tiny_model_dir, task_files, jobs), out)

    # the job's weights and optimizer state before each of its steps, and when it is stopped
    before, at_stop = {}, {}
    real_step, real_stop = t.step, t._stop

    def step():
        if "bad" in t.jobs:
            before["w"], before["tensors"] = weights(t, "bad"), _opt_tensors(t.jobs["bad"].optimizer)
        return real_step()

    def stop(job, error):
        if job.name == "bad":
            at_stop["w"], at_stop["tensors"] = weights(t, "bad"), _opt_tensors(job.optimizer)
        return real_stop(job, error)
    t.step, t._stop = step, stop
    poison(t, "bad", how, at_step)  # after the snapshots: a poisoned weight is part of "before"
    t.run()

    st = t.status["bad"]
    assert st.state == "failed", (how, st)
    failed_at = int(st.error.split("non-finite training at step ")[1].split(" ")[0])
    assert st.step == failed_at - 1, "the status keeps the last good step"
    if how != "lr":
        assert failed_at == at_step
    # the skipped step changed nothing: weights and optimizer state as before it
    for k, v in before["w"].items():
        torch.testing.assert_close(at_stop["w"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for k, v in before["tensors"].items():
        if k in at_stop["tensors"]:
            torch.testing.assert_close(at_stop["tensors"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert "bad" not in t.jobs and "bad" not in t.am.configs
    assert not (out / "adapters" / "bad").exists(), "a non-finite adapter is never written"
    assert all(s <= failed_at - 1 for s in finite_checkpoints(out, "bad"))
    assert "bad" not in t.evaluate(max_examples=2, max_new_tokens=2)

    for name, spec in partners.items():
        assert t.status[name].state == "done"
        alone = Trainer(run_config(tiny_model_dir, task_files, {name: spec}), tmp_path / name)
        alone.run()
        torch.testing.assert_close(losses(t, name), losses(alone, name), atol=1e-5, rtol=1e-5)
        # whole tensors: Adam turns float rounding on near-zero gradients into lr-sized steps
        assert_close_tensors(weights(t, name), weights(alone, name), 1e-3)
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()


def assert_close_tensors(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert float((got[k] - v).norm() / v.norm().clamp_min(1e-12)) < tol, k


def _opt_tensors(opt):
    return {f"{i}.{k}": v.detach().clone() for i, s in enumerate(opt.state.values())
            for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_an_adapter_gone_non_finite_on_its_last_step_is_not_saved(tiny_model_dir, task_files, tmp_path):
    """The last line of defence: whatever made the weights non-finite, they are never written."""
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"steps": 2}, "reverse": {"steps": 2}}), tmp_path)
    real = t.engine.step

    def step(jobs):
        stats = real(jobs)
        if t.jobs["upper"].done:
            with torch.no_grad():
                t.jobs["upper"].parameters[-1].view(-1)[-1] = math.inf
        return stats
    t.engine.step = step
    t.run()
    st = t.status["upper"]
    assert st.state == "failed" and "tensors are not finite" in st.error and "adapters/upper" in st.error
    assert not (tmp_path / "adapters" / "upper").exists()
    assert finite_checkpoints(tmp_path, "upper") == []
    assert t.status["reverse"].state == "done"


# ---- a failed save fails its job alone ---------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_a_failed_save_fails_that_job_alone_naming_job_and_path(seed, tiny_model_dir, task_files, tmp_path,
                                                              monkeypatch):
    rng = random.Random(100 + seed)
    jobs = {f"j{i}": random_job(rng) for i in range(3)}
    victim = rng.choice(sorted(jobs))
    jobs[victim]["checkpoint_every"] = 1
    how = ("file in the way", "disk full on the adapter", "permission denied on a checkpoint")[seed % 3]
    out = tmp_path / "out"
    ckpt_dir = out / "checkpoints" / victim
    if how == "file in the way":
        ckpt_dir.parent.mkdir(parents=True)
        ckpt_dir.write_text("not a directory")
    elif how == "disk full on the adapter":
        real = trainer_mod.save_adapter

        def save_adapter(am, name, out_dir, **kw):
            if name == victim:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir))
            return real(am, name, out_dir, **kw)
        monkeypatch.setattr(trainer_mod, "save_adapter", save_adapter)
    else:
        real_ckpt, fail_at = trainer_mod.save_checkpoint, rng.randint(1, 3)

        def save_checkpoint(job, root, **kw):
            if job.name == victim and job.step == fail_at:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ckpt_dir / "ckpt-x"))
            return real_ckpt(job, root, **kw)
        monkeypatch.setattr(trainer_mod, "save_checkpoint", save_checkpoint)

    t = Trainer(run_config(tiny_model_dir, task_files, jobs), out)
    t.run()
    st = t.status[victim]
    assert st.state == "failed", (how, st)
    assert f"job {victim}: cannot write its" in st.error
    where = out / "adapters" / victim if how == "disk full on the adapter" else ckpt_dir
    assert str(where) in st.error, st.error
    assert not (out / "adapters" / victim).exists()
    for name in jobs:
        if name != victim:
            assert t.status[name].state == "done"
            assert (out / "adapters" / name / "adapter_model.safetensors").is_file()


# ---- `rayft train`'s loop: exit code, OOM retried smaller, faults mid-run ----------------------------

class InProcess:
    """A ReplicaWorker called as `rayft train` calls its actor (`.method.remote(...)`), in this process."""

    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.worker, name))


FAKE_RAY = SimpleNamespace(get=lambda value: value)


def train_in_process(cfg, out):
    worker = ReplicaWorker(cfg, str(out))
    return worker, lambda: cli._train(FAKE_RAY, InProcess(worker), out,
                                      SimpleNamespace(steps_per_report=2, no_eval=True, stages=1), 0.0)


def inject_oom(trainer, at_call: int):
    real, calls = trainer.engine.micro_step, {"n": 0}

    def micro_step(jobs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(jobs)
    trainer.engine.micro_step = micro_step


@pytest.mark.parametrize("seed", range(8))
def test_rayft_train_retries_an_out_of_memory_job_smaller_and_it_ends_as_if_it_never_happened(
        seed, tiny_model_dir, task_files, tmp_path, capsys):
    rng = random.Random(200 + seed)
    rows = rng.choice([2, 3, 4])
    big = random_job(rng, dropout=False)  # no dropout: another split of the same rows draws other masks
    big.update(max_seq_len=64, tokens_per_micro_batch=64 * rows, steps=rng.randint(4, 5))
    small = random_job(rng, dropout=False)
    small.update(max_seq_len=32, tokens_per_micro_batch=32, task="upper")
    small["optimizer"]["grad_accumulation"] = 1
    cfg = run_config(tiny_model_dir, task_files, {"big": big, "small": small})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.run()

    out = tmp_path / "oom"
    worker, train = train_in_process(cfg, out)
    inject_oom(worker.trainer, at_call=rng.randint(1, 4))
    assert train() == 0
    printed = capsys.readouterr().out
    assert "out of memory at tokens_per_micro_batch=" + str(64 * rows) in printed and "retried with" in printed
    t = worker.trainer
    job = t.jobs["big"]
    assert job.cfg.tokens_per_micro_batch < 64 * rows
    assert job.cfg.optimizer.grad_accumulation * job.cfg.tokens_per_micro_batch == (
        big["optimizer"]["grad_accumulation"] * 64 * rows)
    summary = {j["name"]: j for j in json.loads((out / "summary.json").read_text())}
    assert summary["big"]["state"] == summary["small"]["state"] == "done"
    for name in ("big", "small"):
        assert losses(t, name) == pytest.approx(losses(straight, name), rel=1e-5)
        assert_close_tensors(weights(t, name), weights(straight, name), 1e-3)


def test_rayft_train_exits_non_zero_when_jobs_fail_mid_run(tiny_model_dir, task_files, tmp_path, capsys):
    """Every job is fine at start; one runs out of memory with one row per micro-batch (cannot shrink),
    one diverges, one cannot write its checkpoints. The fourth finishes; the summary says it all."""
    one_row = {"max_seq_len": 32, "tokens_per_micro_batch": 32}
    jobs = {"fine": {"steps": 4, "task": "upper", **one_row},
            "oom": {"steps": 4, "max_seq_len": 256, "tokens_per_micro_batch": 256, "task": "reverse"},  # the biggest
            "diverge": {"steps": 8, "optimizer": {"lr": 1e6, "max_grad_norm": None}, "task": "upper"},
            "blocked": {"steps": 4, "checkpoint_every": 2, "task": "upper", **one_row}}
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "blocked").write_text("in the way")
    worker, train = train_in_process(run_config(tiny_model_dir, task_files, jobs), out)
    assert all(st.state == "running" for st in worker.trainer.status.values())
    inject_oom(worker.trainer, at_call=1)
    assert train() == 1
    printed = capsys.readouterr().out
    assert "rayft: 4 job(s)" in printed, "the summary is printed"
    summary = {j["name"]: j for j in json.loads((out / "summary.json").read_text())}
    assert {n: j["state"] for n, j in summary.items()} == {
        "fine": "done", "oom": "failed", "diverge": "failed", "blocked": "failed"}
    assert "cannot shrink further" in summary["oom"]["error"]
    assert "non-finite training at step" in summary["diverge"]["error"]
    assert f"job blocked: cannot write its checkpoint under {out}" in summary["blocked"]["error"]
    assert str(out / "checkpoints" / "blocked") in summary["blocked"]["error"]
    for name in ("oom", "diverge", "blocked"):
        assert f"job {name} failed:" in printed
        assert not (out / "adapters" / name).exists()


# ---- checkpoints hold data, not code ---------------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 4, "checkpoint_every": 2}, "reverse": {"steps": 3}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    Trainer(cfg, tmp_path).run(max_steps=2)
    ckpt = tmp_path / "checkpoints" / "upper" / "ckpt-00000002"
    state = ckpt_mod.read_state(ckpt)  # a real one loads as plain data
    marker = tmp_path / "ran"
    torch.save({**state, "history": RunsCode(marker)}, ckpt / "state.pt")

    t = Trainer(cfg, tmp_path)
    assert not marker.exists(), "loading a checkpoint ran code from the storage root"
    st = t.status["upper"]
    assert st.state == "failed" and f"{ckpt / 'state.pt'}: refused" in st.error, st.error
    t.run()
    assert t.status["reverse"].state == "done"
    with pytest.raises(ckpt_mod.CheckpointError, match="state.pt: refused"):
        ckpt_mod.read_state(ckpt)
    assert not marker.exists()


# ---- file modes follow the umask ---------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_adapters_and_checkpoints_are_written_with_the_umask_modes(umask, tiny_model_dir, task_files, tmp_path):
    old = os.umask(umask)
    try:
        Trainer(run_config(tiny_model_dir, task_files, {"upper": {"steps": 2, "checkpoint_every": 1}}), tmp_path).run()
    finally:
        os.umask(old)
    written = []
    for top in (tmp_path / "adapters", tmp_path / "checkpoints"):
        written += [top, *top.rglob("*")]
    assert any(p.name == "adapter_model.safetensors" for p in written)
    assert any(p.name == "state.pt" for p in written)
    for p in written:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)), oct(want))
