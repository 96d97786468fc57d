"""Preference jobs end to end on the tiny model: TRL's row formats read and checked by file and line,
pairs encoded with one prompt and answer-only loss positions, packed side by side, settings
validated by name; a DPO job starts at loss ln 2 against its reference (the base, adapter off) and
learns to prefer the chosen answers."""

import json
import math
import random

import pytest
import torch
from conftest import run_config
from transformers import AutoTokenizer

from rayft.config import ConfigError, parse_config
from rayft.data import DataError, load_examples
from rayft.data.packing import Packer
from rayft.data.pairs import EncodedPair, encode_pair
from rayft.train.trainer import Trainer


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
USER = [{"role": "user", "content": "hi"}]
SAY = [{"role": "assistant", "content": "yes"}]
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt' (only chat rows may leave it implicit)"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string, got int"),
    ({"prompt": USER, "chosen": "a", "rejected": "b"}, "field 'prompt' must be text, as the answers are"),
    ({"prompt": USER, "chosen": SAY, "rejected": "no"}, "fields 'chosen' and 'rejected' must both be messages or both be text"),
    ({"prompt": USER, "chosen": [{"role": "bot", "content": "x"}], "rejected": SAY},
     "chosen[0]: role must be one of system, user, assistant, got 'bot'"),
    ({"chosen": USER + SAY, "rejected": [{"role": "user", "content": "other"}] + SAY},
     "no prompt: the chosen and rejected conversations share no first messages"),
    ({"prompt": USER, "chosen": USER, "rejected": SAY}, "chosen: the answer must start with an assistant message, got 'user'"),
    ({"instruction": "x", "output": "y"}, "mixed formats: this row is alpaca, the dataset is preference"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS)
def test_a_bad_preference_row_is_named_by_file_and_line(row, problem, tmp_path):
    line = random.Random(problem).randint(2, 5)
    path = write_rows(tmp_path / "p.jsonl", [GOOD] * (line - 1) + [row] + [GOOD])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value) == f"{path}: line {line}: {problem}"


def test_a_job_and_its_rows_must_agree_on_the_task(tiny_model_dir, task_files, tmp_path):
    for objective, data, need in [("dpo", "upper", "preference rows"), ("sft", "prefer", "alpaca or chat rows")]:
        cfg = run_config(tiny_model_dir, task_files, {"j": {"task": data, "objective": objective}})
        t = Trainer(cfg, tmp_path / objective)
        assert t.status["j"].state == "failed"
        assert f"task {objective} needs {need}" in t.status["j"].error and str(task_files[data]) in t.status["j"].error


@pytest.mark.parametrize("over,problem", [
    ({"task": "sft", "preference": {"beta": 0.2}}, "preference: only for task dpo, cpo or orpo"),
    ({"task": "dpo", "preference": {"loss_type": "simpo"}}, "'simpo' is not a dpo loss (use sigmoid, hinge, ipo)"),
    ({"task": "cpo", "preference": {"loss_type": "hinge", "label_smoothing": 0.1}},
     "label_smoothing: only for loss_type sigmoid or simpo"),
    ({"task": "orpo", "max_seq_len": 64, "tokens_per_micro_batch": 100}, "must hold a pair"),
    ({"task": "dpo", "preference": {"beta": 0}}, "preference.beta"),
])
def test_bad_preference_settings_are_refused_by_name(over, problem):
    job = {"adapter": "a", "dataset": "d", "steps": 1, **over}
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"base_model": {"path": "m"}, "adapters": [{"name": "a"}],
                      "datasets": [{"name": "d", "path": "d.jsonl"}], "jobs": [job]})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _words(rng):
    return " ".join("".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 3)))


@pytest.mark.parametrize("seed", range(12))
def test_a_pair_shares_its_prompt_and_is_scored_on_its_answers_only(seed, tokenizer):
    rng = random.Random(seed)
    prompt, chosen, rejected = _words(rng), _words(rng), _words(rng)
    chat = seed % 2 == 1
    if chat:
        user = [{"role": "user", "content": prompt}]
        row = {"prompt": user, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        implicit = {"chosen": user + row["chosen"], "rejected": user + row["rejected"]}
        assert encode_pair(implicit, tokenizer) == encode_pair(row, tokenizer), "an implicit prompt is the same pair"
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    pair = encode_pair(row, tokenizer)
    for seq, text in zip(pair.sequences, (chosen, rejected)):
        n = seq.loss_mask.index(True)
        assert not any(seq.loss_mask[:n]) and all(seq.loss_mask[n:]), "loss on the answer, and only there"
        assert seq.input_ids[:n] == pair.chosen.input_ids[:pair.chosen.loss_mask.index(True)], "one prompt"
        answer = tokenizer.decode(seq.input_ids[n:], skip_special_tokens=True)
        assert answer.replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("seed", range(8))
def test_pairs_pack_side_by_side_and_never_split(seed, tokenizer):
    rng = random.Random(seed)
    pairs = [encode_pair({"prompt": _words(rng), "chosen": _words(rng), "rejected": _words(rng)}, tokenizer)
             for _ in range(rng.randint(3, 30))]
    seq_len = rng.choice([24, 32, 64])
    packer = Packer(pairs, 2 * seq_len, rng.randint(1, 3), seed=seed, sequence_len=seq_len)
    assert packer.report.kept + packer.report.cut_pairs == len(pairs)
    assert all(len(s) <= seq_len for p in packer.examples for s in p.sequences)
    for _ in range(5):
        batch = packer.next_batch()
        assert batch.num_sequences % 2 == 0
        for row_ids, row_seq in zip(batch.input_ids.tolist(), batch.seq_ids.tolist()):
            ids = {}
            for t, s in zip(row_ids, row_seq):
                if s >= 0:
                    ids.setdefault(s, []).append(t)
            assert len(ids) % 2 == 0, "a row holds whole pairs"
            for k in range(0, len(ids), 2):  # chosen then rejected, one prompt
                kept = [p for p in packer.examples if isinstance(p, EncodedPair)
                        and p.chosen.input_ids == ids[k] and p.rejected.input_ids == ids[k + 1]]
                assert kept, "each pair's two sequences sit next to each other"


def test_a_dpo_job_starts_at_ln2_against_the_base_and_learns_to_prefer(tiny_model_dir, task_files, tmp_path):
    """At init the adapter is the identity (B = 0): the policy is its reference, so every reward is
    0 and the loss ln 2. Trained, the chosen answers' reward rises above the rejected ones'."""
    jobs = {"p": {"task": "prefer", "objective": "dpo", "steps": 30, "optimizer": {"lr": 5e-3},
                  "preference": {"beta": 0.5}, "dataset": {"eval_split": 0.25}},
            "s": {"task": "upper", "steps": 30}}
    t = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "out")
    first = t.step().records["p"]
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)
    assert first.metrics["rewards/chosen"] == first.metrics["rewards/rejected"] == 0.0
    t.run()
    last = t.jobs["p"].history[-5:]
    assert sum(r.metrics["rewards/margins"] for r in last) / 5 > 0.5
    assert sum(r.metrics["rewards/accuracies"] for r in last) / 5 > 0.8
    assert all(r.loss < math.log(2) for r in last)
    assert t.status["p"].state == t.status["s"].state == "done"
    assert torch.isfinite(torch.tensor([r.loss for r in t.jobs["p"].history])).all()
    # held out: the adapter prefers the chosen answers where the base does not
    held = t.evaluate()["p"]
    assert held["examples"] == 15
    assert held["adapter_preference_accuracy"] >= 0.9 and held["base_preference_accuracy"] <= 0.6


def test_a_dpo_job_from_an_adapter_measures_itself_against_that_adapter_frozen(tiny_model_dir, task_files, tmp_path):
    """As TRL: starting from an SFT adapter, DPO's reference is that adapter (frozen), not the base:
    the first loss is ln 2 again, and the reference never moves while the job trains."""
    from safetensors.torch import load_file

    from rayft.train.job import reference_adapter

    sft = Trainer(run_config(tiny_model_dir, task_files, {"warm": {"task": "upper", "steps": 5,
                                                                    "optimizer": {"lr": 1e-2}}}), tmp_path / "sft")
    sft.run()
    init = tmp_path / "sft" / "adapters" / "warm"
    jobs = {"p": {"task": "prefer", "objective": "dpo", "steps": 6, "adapter": {"init_from": str(init)},
                  "optimizer": {"lr": 5e-3}}}
    t = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "dpo")
    ref = reference_adapter("p")
    frozen = {k: v.clone() for k, v in t.am.adapter_state(ref).items()}
    assert not any(p.requires_grad for p in t.am.adapter_parameters(ref).values())
    first = t.step().records["p"]
    assert first.loss == pytest.approx(math.log(2), abs=1e-6) and first.metrics["rewards/margins"] == 0.0
    t.run()
    assert t.status["p"].state == "done" and t.jobs["p"].history[-1].metrics["rewards/margins"] != 0.0
    for k, v in t.am.adapter_state(ref).items():
        assert torch.equal(v, frozen[k]), k
    saved = load_file(str(tmp_path / "dpo" / "adapters" / "p" / "adapter_model.safetensors"))
    assert saved.keys() == load_file(str(init / "adapter_model.safetensors")).keys()
    t.remove_job("p")
    assert ref not in t.am.configs and "p" not in t.am.configs


def _pairs_of(batch):
    """The (chosen, rejected) pairs of a packed batch: each sequence's ids and, per token, whether
    it is an answer token (a completion token, in TRL's words)."""
    seqs = []
    for ids, tgt, seq in zip(batch.input_ids.tolist(), batch.targets.tolist(), batch.seq_ids.tolist()):
        by = {}
        for t, g, s in zip(ids, tgt, seq):
            if s >= 0:
                by.setdefault(s, []).append((t, g))
        for s in sorted(by):
            toks = [t for t, _ in by[s]]
            completion = [0] + [int(g != -100) for _, g in by[s][:-1]]  # target at t scores token t + 1
            seqs.append((toks, completion))
    return list(zip(seqs[0::2], seqs[1::2]))


def _padded(sequences, pad):
    width = max(len(t) for t, _ in sequences)
    ids = torch.tensor([t + [pad] * (width - len(t)) for t, _ in sequences])
    attn = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in sequences])
    completion = torch.tensor([c + [0] * (width - len(c)) for _, c in sequences])
    return ids, attn, completion


@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("dpo", "hinge"), ("dpo", "ipo"),
                                                 ("cpo", "sigmoid"), ("cpo", "simpo"), ("cpo", "ipo"),
                                                 ("orpo", "sigmoid")])
def test_a_fused_preference_step_equals_trl_on_the_same_model_batch_and_adapter(
        objective, loss_type, tiny_model_dir, task_files, tmp_path):
    """Two steps in, beside an SFT job: the adapter as it is is saved and loaded into PEFT, the next
    micro-batch's pairs are fed to TRL's own trainer code (DPOTrainer._compute_loss with the PEFT
    model's per-token log-probs, adapter on and off; CPOTrainer / ORPOTrainer.get_batch_loss_metrics
    with the PEFT model itself). rayft's step reports the same loss and metrics (ORPO's NLL, as
    TRL's, over the chosen sequence's prompt and answer)."""
    from functools import partial
    from types import SimpleNamespace

    from peft import PeftModel
    from test_preference_loss import trl_dpo
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from rayft.adapters import save_adapter

    pref = {"loss_type": loss_type, "beta": 0.5}
    jobs = {"p": {"task": "prefer_chat", "objective": objective, "steps": 3, "preference": pref,
                  "optimizer": {"lr": 2e-2}, "adapter": {"target_modules": "all-linear"}},
            "s": {"task": "upper", "steps": 3}}
    t = Trainer(run_config(tiny_model_dir, task_files, jobs), tmp_path / "out")
    t.step(), t.step()
    job = t.jobs["p"]
    save_adapter(t.am, "p", tmp_path / "now", base_model=str(tiny_model_dir))
    batch = __import__("copy").deepcopy(job.packer).next_batch()
    rec = t.step().records["p"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      tmp_path / "now").eval()
    pairs = _pairs_of(batch)
    pad = t.tokenizer.pad_token_id
    ids, attn, completion = _padded([c for c, _ in pairs] + [r for _, r in pairs], pad)

    def per_token_logps():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    with torch.no_grad():
        if objective == "dpo":
            policy = per_token_logps()
            with model.disable_adapter():
                ref = per_token_logps()
            want, metrics = trl_dpo(policy, ref, completion, loss_type, 0.5, 0.0)
        else:
            labels = ids.masked_fill(completion == 0, -100)
            n = len(pairs)
            trl_batch = {"chosen_input_ids": ids[:n], "chosen_attention_mask": attn[:n], "chosen_labels": labels[:n],
                         "rejected_input_ids": ids[n:], "rejected_attention_mask": attn[n:], "rejected_labels": labels[n:]}
            cls = CPOTrainer if objective == "cpo" else ORPOTrainer
            me = SimpleNamespace(is_encoder_decoder=False, pad_token_id=pad, padding_value=pad, accelerator=SimpleNamespace(
                device="cpu", gather_for_metrics=lambda x: x), aux_loss_enabled=False, cpo_alpha=1.0,
                loss_type=loss_type, beta=0.5, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0)
            me.concatenated_inputs = cls.concatenated_inputs
            me.get_batch_logps = cls.get_batch_logps
            me.concatenated_forward = partial(cls.concatenated_forward, me)
            me.cpo_loss = partial(CPOTrainer.cpo_loss, me)
            me.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, me)
            want, metrics = cls.get_batch_loss_metrics(me, model, trl_batch)
            metrics = {k: float(v) for k, v in metrics.items()}
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"] + (["log_odds_ratio", "log_odds_chosen"] if objective == "orpo" else [])
    assert metrics["rewards/margins"] != 0.0, "the adapter has moved off its reference"
    for name in names:
        assert rec.metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    assert rec.loss == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    if objective != "dpo":
        assert rec.metrics["nll_loss"] == pytest.approx(metrics["nll_loss"], rel=1e-4)
