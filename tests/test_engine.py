"""The fused step: a job's result does not depend on who it shares the batch with; exact resume."""

import pytest
import torch
from conftest import run_config

from rayft.train.trainer import Trainer


def losses(trainer, job):
    return [r.loss for r in trainer.jobs[job].history]


def weights(trainer, job):
    return trainer.am.adapter_state(trainer.jobs[job].adapter.name)


MIXED = {
    # different ranks, variants, targets, row lengths, optimizers, schedules, accumulation, dropout
    "upper": {"adapter": {"r": 4, "dropout": 0.1}, "optimizer": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1}},
    "reverse": {"adapter": {"variant": "dora", "r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                "max_seq_len": 32, "tokens_per_micro_batch": 96,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "grad_accumulation": 2}},
    "double": {"adapter": {"variant": "vera", "r": 16}, "steps": 6,
               "optimizer": {"lr": 5e-3, "loraplus_lr_ratio": 4, "schedule": "linear", "max_grad_norm": 0.5}},
}


def test_fused_jobs_equal_jobs_trained_alone(tiny_model_dir, task_files, tmp_path):
    fused = Trainer(run_config(tiny_model_dir, task_files, MIXED), tmp_path / "fused")
    fused.run()
    assert all(j.done for j in fused.jobs.values())
    for name in MIXED:
        alone = Trainer(run_config(tiny_model_dir, task_files, {name: MIXED[name]}), tmp_path / name)
        alone.run()
        assert len(losses(alone, name)) == alone.jobs[name].total_steps
        torch.testing.assert_close(losses(fused, name), losses(alone, name), atol=1e-5, rtol=1e-5)
        got, want = weights(fused, name), weights(alone, name)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")
    # and training moved the weights and lowered nothing to NaN
    assert all(torch.isfinite(torch.tensor(losses(fused, n))).all() for n in MIXED)


def test_resumed_job_equals_uninterrupted_run(tiny_model_dir, task_files, tmp_path):
    jobs = {
        "upper": {"steps": 6, "checkpoint_every": 2, "adapter": {"dropout": 0.2},
                  "optimizer": {"schedule": "cosine", "warmup_steps": 2, "lr": 1e-2}},
        "reverse": {"steps": 6, "checkpoint_every": 3, "optimizer": {"grad_accumulation": 2, "lr": 1e-2}},
    }
    straight = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "straight")
    straight.run()

    out = tmp_path / "interrupted"
    first = Trainer(run_config(tiny_model_dir, task_files, jobs), out)
    first.run(max_steps=4)  # upper checkpointed at 4, reverse at 3: both lose work past that
    del first
    second = Trainer(run_config(tiny_model_dir, task_files, jobs), out)
    assert second.status["upper"].resumed_from == 4
    assert second.status["reverse"].resumed_from == 3
    second.run()
    for name in jobs:
        # after the resume the two jobs share micro-batches in another alignment, so equal up to float
        # rounding; the single-job test below asks for bit-exactness
        torch.testing.assert_close(losses(second, name), losses(straight, name), atol=1e-6, rtol=1e-6)
        got, want = weights(second, name), weights(straight, name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
    # the finished adapters are on disk in PEFT format
    assert (out / "adapters" / "upper" / "adapter_model.safetensors").is_file()


def test_single_job_resume_is_bit_exact(tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 5, "checkpoint_every": 2, "adapter": {"dropout": 0.3, "variant": "dora"},
                      "optimizer": {"schedule": "linear", "warmup_steps": 1, "lr": 1e-2}}}
    straight = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "a")
    straight.run()
    first = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "b")
    first.run(max_steps=3)  # last checkpoint at step 2: step 3 is lost and redone
    second = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "b")
    assert second.status["upper"].resumed_from == 2
    second.run()
    assert losses(second, "upper") == losses(straight, "upper")
    for k, v in weights(straight, "upper").items():
        assert torch.equal(weights(second, "upper")[k], v), k


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir, task_files, tmp_path):
    """2 micro-batches of 1 row accumulated == the same 2 rows in one micro-batch, however many loss
    tokens each row holds (the loss is normalised over the whole accumulation window)."""
    opt = {"name": "sgd", "lr": 0.1, "max_grad_norm": None}
    big = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"tokens_per_micro_batch": 128, "optimizer": opt}}),
                  tmp_path / "big")
    small = Trainer(run_config(tiny_model_dir, task_files, {
        "upper": {"tokens_per_micro_batch": 64, "optimizer": {**opt, "grad_accumulation": 2}}}), tmp_path / "small")
    big.run(max_steps=1)
    small.run(max_steps=1)
    # token-mean per micro-batch then averaged: equal when both rows hold equally many loss tokens
    b, s = big.jobs["upper"], small.jobs["upper"]
    assert b.step == s.step == 1
    for k, v in weights(big, "upper").items():
        torch.testing.assert_close(v, weights(small, "upper")[k], atol=1e-6, rtol=1e-4, msg=k)
    assert b.history[0].loss == pytest.approx(s.history[0].loss, rel=1e-6)


def test_loraplus_gives_b_a_larger_learning_rate(tiny_model_dir, task_files, tmp_path):
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"optimizer": {"lr": 1e-3, "loraplus_lr_ratio": 16}}}),
                tmp_path)
    groups = t.jobs["upper"].optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert len(groups[0]["params"]) == len(groups[1]["params"]) > 0


def test_bad_job_fails_alone(tiny_model_dir, task_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": oops}\n')
    cfg = run_config(tiny_model_dir, {**task_files, "bad": bad}, {
        "upper": {}, "bad": {"task": "bad"}, "wrongtarget": {"task": "upper", "adapter": {"target_modules": ["nope"]}}})
    t = Trainer(cfg, tmp_path / "out")
    assert t.status["bad"].state == "failed" and "bad.jsonl: line 2" in t.status["bad"].error
    assert t.status["wrongtarget"].state == "failed" and "match no linear layer" in t.status["wrongtarget"].error
    t.run()
    assert t.status["upper"].state == "done"


def test_chat_dataset_and_epochs_and_padding_report(tiny_model_dir, task_files, tmp_path):
    import json

    chat = tmp_path / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Count to {i % 5 + 1}."},
                {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))},
            ]}) + "\n")
    cfg = run_config(tiny_model_dir, {**task_files, "chat": chat}, {
        "chat": {"task": "chat", "steps": None, "epochs": 2, "dataset": {"eval_split": 0.2}}})
    t = Trainer(cfg, tmp_path / "out")
    job = t.jobs["chat"]
    # 24 training rows, 2 epochs of packed 64-token rows, 2 rows per micro-batch
    assert job.total_steps == 2 * job.packer.batches_per_epoch()
    assert len(t.eval_rows["chat"]) == 6
    t.run()
    st = t.status["chat"]
    assert st.state == "done" and st.step == job.total_steps
    assert 0.0 <= st.padding < 0.5  # packed: several conversations per row
    assert abs(job.packer.progress - 2.0) < 0.5
    results = t.evaluate(max_new_tokens=4)
    assert results["chat"]["examples"] == 6


def test_long_examples_are_counted_and_reported_and_target_errors_fail_alone(tiny_model_dir, task_files, tmp_path):
    from rayft.data import encode_examples, load_examples

    cfg = run_config(tiny_model_dir, task_files, {
        "upper": {"max_seq_len": 16, "tokens_per_micro_batch": 64},  # prompts are ~20 tokens: no answer left
        "reverse": {"max_seq_len": 16, "tokens_per_micro_batch": 64, "long_examples": "skip", "task": "upper"},
        "double": {"adapter": {"target_modules": ["qproj"]}},
        "partial": {"max_seq_len": 26, "tokens_per_micro_batch": 52, "task": "upper"},  # some keep their answer
    })
    t = Trainer(cfg, tmp_path)
    st = t.status["upper"]
    assert st.state == "failed" and f"{task_files['upper']}: no loss tokens" in st.error, st.error
    assert t.status["reverse"].state == "failed" and "no examples left to pack" in t.status["reverse"].error
    assert str(task_files["upper"]) in t.status["reverse"].error
    assert t.status["double"].state == "failed" and "match no linear layer" in t.status["double"].error
    encoded = encode_examples(load_examples(task_files["upper"]), t.tokenizer, None)
    long = [e for e in encoded if len(e) > 26]
    no_answer = [e for e in long if not any(e.loss_mask[1:26])]
    assert 0 < len(no_answer) < len(long)  # the data makes each count mean something
    assert t.status["partial"].warnings == [
        f"{len(long)} of {len(encoded)} examples longer than max_seq_len=26 were truncated",
        f"{len(no_answer)} of {len(encoded)} examples kept no answer token after truncation to max_seq_len=26 "
        "(they teach nothing)"]
    t.run()
    assert t.status["partial"].state == "done"


def test_job_continues_training_an_adapter_saved_by_peft(tiny_model_dir, task_files, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "from_peft")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        want = pm.eval()(ids).logits

    adapter = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(tmp_path / "from_peft")}
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"adapter": adapter, "steps": 2}}), tmp_path / "out")
    with torch.no_grad(), t.am.use("upper", rows=1):
        got = t.model.eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    t.run()
    assert t.status["upper"].state == "done"

    wrong = {**adapter, "r": 8}
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"adapter": wrong}}), tmp_path / "out2")
    assert t.status["upper"].state == "failed"
    assert "from_peft/adapter_config.json: r is 4, but adapter 'upper' asks for 8" in t.status["upper"].error
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"adapter": {**adapter, "alpha": 16}}}), tmp_path / "o3")
    assert "scale is 2.0, but adapter 'upper' asks for 4.0" in t.status["upper"].error


def test_rows_of_one_example_take_the_unmasked_path_with_the_same_result(tiny_model_dir, task_files, tmp_path):
    """Alone, 40-token rows hold one example each (no mask, default positions); fused beside a packed
    job the same rows run under the block mask with explicit positions. Same losses either way."""
    one_per_row = {"max_seq_len": 40, "tokens_per_micro_batch": 80, "steps": 3, "optimizer": {"lr": 1e-2}}
    packed = {"task": "upper", "max_seq_len": 80, "tokens_per_micro_batch": 160, "steps": 3}
    alone = Trainer(run_config(tiny_model_dir, task_files, {"upper": one_per_row}), tmp_path / "a")
    batch = alone.jobs["upper"].packer.next_batch()
    assert int(batch.seq_ids.max()) == 0  # one example per row: the engine passes no mask
    alone = Trainer(run_config(tiny_model_dir, task_files, {"upper": one_per_row}), tmp_path / "a2")
    alone.run()
    fused = Trainer(run_config(tiny_model_dir, task_files, {"upper": one_per_row, "double": packed}), tmp_path / "b")
    fused.run()
    torch.testing.assert_close(losses(fused, "upper"), losses(alone, "upper"), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_from_another_setup_fails_its_job_clearly(tiny_model_dir, task_files, tmp_path):
    Trainer(run_config(tiny_model_dir, task_files, {"upper": {"checkpoint_every": 1}}), tmp_path).run(max_steps=1)
    t = Trainer(run_config(tiny_model_dir, task_files, {"upper": {"adapter": {"r": 8}}, "reverse": {}}), tmp_path)
    st = t.status["upper"]
    assert st.state == "failed" and "ckpt-00000001: cannot resume from this checkpoint" in st.error
    assert "upper" not in t.am.configs
    t.run()
    assert t.status["reverse"].state == "done"


def test_a_preempted_job_resumes_elsewhere_and_ends_as_if_never_moved(tiny_model_dir, task_files, tmp_path):
    jobs = {"upper": {"steps": 6, "adapter": {"dropout": 0.1}, "optimizer": {"schedule": "cosine", "lr": 1e-2}}}
    straight = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "a")
    straight.run()

    both = {**jobs, "reverse": {"steps": 6}}
    first = Trainer(run_config(tiny_model_dir, task_files, both), tmp_path / "b")
    first.run(max_steps=2)
    assert first.remove_job("upper").state == "preempted"  # checkpointed at step 2, adapter gone
    assert "upper" not in first.am.configs
    first.run()  # its neighbour carries on alone
    assert first.status["reverse"].state == "done"

    second = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "b")  # another replica
    assert second.status["upper"].resumed_from == 2
    second.run()
    assert losses(second, "upper") == pytest.approx(losses(straight, "upper"), rel=1e-5)
    # it shared its first steps with a neighbour (other row lengths, a mask): float rounding differs, and
    # Adam turns it into lr-sized steps on near-zero gradients, so compare whole tensors, not elements
    for k, v in weights(straight, "upper").items():
        assert float((weights(second, "upper")[k] - v).norm() / v.norm()) < 1e-4, k


def test_an_out_of_memory_step_takes_off_one_job_and_the_others_go_on_unharmed(tiny_model_dir, task_files, tmp_path,
                                                                              monkeypatch):
    from rayft.scheduler.plan import halve_micro_batch
    from rayft.store.registry import job_config

    # no dropout: a different split of the same rows draws different masks
    jobs = {"upper": {"steps": 6, "tokens_per_micro_batch": 256, "optimizer": {"grad_accumulation": 2}},
            "reverse": {"steps": 6, "max_seq_len": 32, "tokens_per_micro_batch": 96}}
    cfg = run_config(tiny_model_dir, task_files, jobs)
    straight = Trainer(cfg, tmp_path / "a")
    straight.run()

    t = Trainer(cfg, tmp_path / "b")
    t.run(max_steps=2)
    real, calls = t.engine.micro_step, {"n": 0}

    def oom_on_second_micro_step(js):  # upper accumulates two micro-batches; reverse steps after one
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(js)

    monkeypatch.setattr(t.engine, "micro_step", oom_on_second_micro_step)
    t.step()
    monkeypatch.setattr(t.engine, "micro_step", real)
    oom = t.status["upper"]
    assert oom.state == "oom" and "out of memory at tokens_per_micro_batch=256" in oom.error
    assert "upper" not in t.jobs and t.status["reverse"].step == 3, "reverse's finished step stands"
    t.run()
    assert losses(t, "reverse") == pytest.approx(losses(straight, "reverse"), rel=1e-5)

    # upper's half-done step 3 was undone and it was checkpointed at step 2; it resumes with half the
    # rows per micro-batch and twice the accumulation: the same training
    smaller = halve_micro_batch(job_config(cfg, "upper"))
    job = smaller.jobs[0]
    assert (job.tokens_per_micro_batch, job.optimizer.grad_accumulation) == (128, 4)
    again = Trainer(smaller, tmp_path / "b")
    assert again.status["upper"].resumed_from == 2
    again.run()
    assert losses(again, "upper") == pytest.approx(losses(straight, "upper"), rel=1e-5)
    for k, v in weights(straight, "upper").items():
        assert float((weights(again, "upper")[k] - v).norm() / v.norm()) < 1e-4, k
    cfg = run_config(tiny_model_dir, task_files, {"r": {"task": "reverse", "max_seq_len": 32, "tokens_per_micro_batch": 96}})
    three = halve_micro_batch(job_config(cfg, "r"))
    assert (three.jobs[0].tokens_per_micro_batch, three.jobs[0].optimizer.grad_accumulation) == (32, 3), "3 rows: 1 row x 3"
    assert halve_micro_batch(three) is None, "one row per micro-batch cannot shrink"


@pytest.mark.parametrize("family", ["opt", "qwen2_moe", "gpt2", "gemma2"])
def test_fused_jobs_equal_jobs_trained_alone_on_models_that_reshape_tokens(family, tiny_model_dir, task_files, tmp_path):
    """The real engine on models whose linears see (rows·tokens, d) (OPT's fc1/fc2, Qwen2-MoE's
    shared expert) or are Conv1D (GPT-2), or that have no sdpa (Gemma2: loaded with eager, packed rows
    masked for eager): all-linear jobs, fused equal to alone."""
    from test_model_families import build
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model_dir = tmp_path / family
    build(family, len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    jobs = {"upper": {"adapter": {"r": 4, "target_modules": "all-linear"}, "max_seq_len": 48},
            "reverse": {"adapter": {"variant": "dora", "r": 2, "target_modules": "all-linear"},
                        "optimizer": {"name": "sgd", "lr": 0.05}}}
    fused = Trainer(run_config(model_dir, task_files, jobs), tmp_path / "fused")
    fused.run()
    assert all(j.done for j in fused.jobs.values()), {n: s.error for n, s in fused.status.items()}
    for name in jobs:
        alone = Trainer(run_config(model_dir, task_files, {name: jobs[name]}), tmp_path / name)
        alone.run()
        torch.testing.assert_close(losses(fused, name), losses(alone, name), atol=1e-5, rtol=1e-5)
        got, want = weights(fused, name), weights(alone, name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{family} {name} {k}")
