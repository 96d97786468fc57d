"""eval.loss_every: each SFT job's held-out loss, measured every N optimizer steps and at its last,
recorded with the step. It equals the loss PEFT's model gives with the saved adapter, and measuring
it changes nothing of the training (dropout included)."""

import torch
import torch.nn.functional as F
from conftest import run_config
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rayft.data import encode_examples
from rayft.train.trainer import Trainer

JOBS = {"upper": {"steps": 5, "dataset": {"eval_split": 0.2}, "adapter": {"dropout": 0.1}},
        "reverse": {"steps": 4, "dataset": {"eval_split": 0.25}}}


def peft_heldout_loss(model_dir, adapter_dir, encoded) -> float:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:  # one at a time, unpadded: nothing shared with the batched path
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            mask = torch.tensor(e.loss_mask[1:])
            total += float(F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum"))
            count += int(mask.sum())
    return total / count


def test_heldout_loss_every_n_steps_equals_peft_and_changes_no_weight(tiny_model_dir, task_files, tmp_path):
    measured = Trainer(run_config(tiny_model_dir, task_files, JOBS, eval={"loss_every": 2, "max_examples": 8}),
                       tmp_path / "measured")
    measured.run()
    plain = Trainer(run_config(tiny_model_dir, task_files, JOBS), tmp_path / "plain")
    plain.run()
    for name, over in JOBS.items():
        job = measured.jobs[name]
        got = {r.step: r.eval_loss for r in job.history if r.eval_loss is not None}
        last = over["steps"]
        assert sorted(got) == sorted({s for s in range(2, last + 1, 2)} | {last}), (name, got)
        assert all(r.eval_loss is None for r in plain.jobs[name].history)
        st = measured.status[name]
        assert (st.eval_step, st.eval_loss) == (last, got[last])
        rows = measured.eval_rows[name][:8]
        encoded = encode_examples(rows, measured.tokenizer)
        want = peft_heldout_loss(tiny_model_dir, tmp_path / "measured" / "adapters" / name, encoded)
        assert abs(got[last] - want) < 1e-4 * max(1.0, want), (name, got[last], want)
        assert len({round(v, 6) for v in got.values()}) == len(got)  # it moves as the adapter trains
        # the same training: losses and weights as without measuring
        assert [r.loss for r in job.history] == [r.loss for r in plain.jobs[name].history]
        a, b = measured.am.adapter_state(name), plain.am.adapter_state(name)
        assert all(torch.equal(a[k], b[k]) for k in a)
