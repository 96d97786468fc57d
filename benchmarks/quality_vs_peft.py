"""How well rayft learns compared with PEFT: each task of a config trained both ways for the same budget.

rayft trains the config's jobs fused, as `rayft train` does. PEFT trains each job alone: its own
`get_peft_model(base, LoraConfig(...))` from the adapter's settings (PEFT's init), torch's AdamW with
the job's hyper-parameters, the job's schedule and clipping, on exactly the packed rows rayft's job
drew (cut back into examples, run right-padded with an attention mask), with rayft's loss
normalisation (summed over the loss tokens of an accumulation window, divided by their count).
By default both start from PEFT's initial adapter (rayft loads it with init_from), so the table
compares the training, not the luck of two random inits; --own-init lets rayft draw its own.
Both are then scored on the same held-out rows: token-mean eval loss on the answer tokens and
greedy exact match.

    python benchmarks/quality_vs_peft.py configs/demo.yaml --steps 60

The run ends with a markdown table to paste into the README. tests/test_peft_parity.py uses the
PEFT side here (train_peft) to check step-for-step parity on the real base.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

# Runnable as a plain script from anywhere in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayft.config import OptimizerConfig  # noqa: E402
from rayft.data import IGNORE  # noqa: E402
from rayft.train.optim import lr_factor  # noqa: E402


def example_batch(packed):
    """A packed micro-batch cut back into its examples, right-padded: (input_ids, attention_mask, targets).
    A target is the example's own next token (checked), never one across an example boundary."""
    examples = []
    for ids, tgt, seq in zip(packed.input_ids, packed.targets, packed.seq_ids):
        for s in seq.unique():
            if s >= 0:
                keep = seq == s
                examples.append((ids[keep], tgt[keep]))
    width = max(len(i) for i, _ in examples)
    ids = torch.stack([F.pad(i, (0, width - len(i))) for i, _ in examples])
    mask = torch.stack([F.pad(torch.ones_like(i), (0, width - len(i))) for i, _ in examples])
    targets = torch.stack([F.pad(t, (0, width - len(t)), value=IGNORE) for _, t in examples])
    for i, t in zip(ids, targets):
        shown = t[:-1] != IGNORE
        if not (torch.equal(t[:-1][shown], i[1:][shown]) and t[-1] == IGNORE):
            raise AssertionError("a packed target is not its example's next token")
    return ids, mask, targets


def train_peft(model, packer, opt: OptimizerConfig, total_steps: int) -> list[float]:
    """PEFT + torch's AdamW (not fused) on the packer's next micro-batches; returns per-step losses.
    LoRA+ puts lora_B in a group at lr * ratio; the schedule is rayft's formula as a LambdaLR."""
    if opt.name != "adamw":
        raise ValueError(f"the PEFT side trains with AdamW, not {opt.name!r}")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if opt.loraplus_lr_ratio:
        groups = [{"params": [p for n, p in trainable.items() if "lora_B" not in n], "lr": opt.lr},
                  {"params": [p for n, p in trainable.items() if "lora_B" in n], "lr": opt.lr * opt.loraplus_lr_ratio}]
    else:
        groups = [{"params": list(trainable.values()), "lr": opt.lr}]
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, opt))
    model.train()
    losses = []
    for _ in range(total_steps):
        window = [packer.next_batch() for _ in range(opt.grad_accumulation)]
        denominator = sum(b.num_loss_tokens for b in window)
        step_loss = 0.0
        for packed in window:
            ids, mask, targets = example_batch(packed)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum") / denominator
            loss.backward()
            step_loss += loss.item()
        if opt.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), opt.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses


def peft_config(adapter):
    """PEFT's config for one rayft adapter: LoraConfig (LoRA, DoRA) or VeraConfig."""
    from peft import LoraConfig, VeraConfig

    if adapter.variant == "vera":
        return VeraConfig(r=adapter.r, target_modules=adapter.target_modules, vera_dropout=adapter.dropout,
                          projection_prng_key=adapter.vera_seed, d_initial=adapter.vera_d_initial,
                          save_projection=True)
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, target_modules=adapter.target_modules,
                      lora_dropout=adapter.dropout, use_rslora=adapter.use_rslora, use_dora=adapter.variant == "dora")


@torch.no_grad()
def eval_loss(model, encoded, use) -> float:
    """Token-mean cross entropy on the answer tokens of held-out examples; `use()` applies the adapter."""
    model.eval()
    total, count = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        targets = torch.tensor([[t if m else IGNORE for t, m in zip(e.input_ids[1:], e.loss_mask[1:])] + [IGNORE]])
        with use():
            logits = model(input_ids=ids).logits.float()
        total += float(F.cross_entropy(logits[0], targets[0], ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
    return total / max(1, count)


class _Plain:
    """A PEFT model where rayft's greedy_generate expects an AdapterModel (its adapter always on)."""

    def __init__(self, model):
        self.model = model

    def use(self, name, rows):
        return nullcontext()


def peft_inits(cfg, base, out: Path) -> dict[str, Path]:
    """PEFT's initial adapter for each adapter of `cfg` (seeded by its first job's seed), saved under `out`."""
    from peft import get_peft_model

    seeds = {}
    for jc in cfg.jobs:
        seeds.setdefault(jc.adapter, jc.seed)
    dirs = {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), peft_config(cfg.adapter(name)))
        dirs[name] = out / "peft-init" / name
        model.save_pretrained(dirs[name])
    return dirs


def compare(config, steps: int, eval_examples: int, out: Path, same_init: bool = True) -> list[dict]:
    """One row per job of `config` (a YAML path or a RunConfig), each trained `steps` steps both ways;
    with same_init both start from PEFT's initial adapter (rayft through init_from), else each from its own."""
    from peft import PeftModel, get_peft_model

    from rayft.config import load_config
    from rayft.data import encode_example, prompt_and_answer
    from rayft.model.load import load_base_model
    from rayft.train.evaluate import exact_match, greedy_generate
    from rayft.train.trainer import Trainer

    cfg = load_config(config) if isinstance(config, str | Path) else config
    jobs = [jc.model_copy(update={"steps": steps, "epochs": None, "checkpoint_every": None}) for jc in cfg.jobs]
    cfg = cfg.model_copy(update={"jobs": jobs})
    base, tokenizer = load_base_model(cfg.base_model)
    inits = peft_inits(cfg, base, out) if same_init else {}
    if inits:
        adapters = [a.model_copy(update={"init_from": inits[a.name]}) if a.name in inits else a for a in cfg.adapters]
        cfg = cfg.model_copy(update={"adapters": adapters})
    trainer = Trainer(cfg, out / "rayft")
    failed = {n: s.error for n, s in trainer.status.items() if s.state == "failed"}
    if failed:
        raise SystemExit(f"jobs failed to start: {failed}")
    packers = {name: copy.deepcopy(job.packer) for name, job in trainer.jobs.items()}
    t0 = time.perf_counter()
    trainer.run()
    rayft_seconds = time.perf_counter() - t0
    scores = trainer.evaluate(max_examples=eval_examples)
    rows = []
    for name, job in trainer.jobs.items():
        template = cfg.dataset(job.cfg.dataset).template
        held_out = trainer.eval_rows[name][:eval_examples]
        encoded = [encode_example(r, tokenizer, template) for r in held_out]
        new_tokens = cfg.eval.max_new_tokens
        rayft_loss = eval_loss(trainer.model, encoded, lambda a=job.adapter.name: trainer.am.use(a, rows=1))

        if same_init:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), inits[job.adapter.name], is_trainable=True)
        else:
            torch.manual_seed(job.cfg.seed)
            peft_model = get_peft_model(copy.deepcopy(base), peft_config(job.adapter))
        t0 = time.perf_counter()
        peft_losses = train_peft(peft_model, packers[name], job.cfg.optimizer, job.total_steps)
        peft_seconds = time.perf_counter() - t0
        pairs = [prompt_and_answer(r, tokenizer, template) for r in held_out]
        answers = [a for _, a in pairs]
        predictions = greedy_generate(_Plain(peft_model), tokenizer, [p for p, _ in pairs], None, new_tokens)
        rows.append({
            "task": name, "variant": job.adapter.variant, "steps": job.total_steps, "eval_examples": len(held_out),
            "rayft_train_loss": job.history[-1].loss, "peft_train_loss": peft_losses[-1],
            "rayft_eval_loss": rayft_loss, "peft_eval_loss": eval_loss(peft_model, encoded, nullcontext),
            "rayft_exact_match": scores[name]["adapter_exact_match"], "peft_exact_match": exact_match(predictions, answers),
            "base_exact_match": scores[name]["base_exact_match"], "peft_seconds": peft_seconds,
        })
    print(f"rayft, all jobs fused: {rayft_seconds:.1f} s; PEFT, job by job: "
          f"{sum(r['peft_seconds'] for r in rows):.1f} s", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| task | variant | steps | eval rows | eval loss rayft | eval loss PEFT | exact match rayft "
             "| exact match PEFT | exact match base |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['variant']} | {r['steps']} | {r['eval_examples']} | {r['rayft_eval_loss']:.3f} "
                     f"| {r['peft_eval_loss']:.3f} | {r['rayft_exact_match']:.2f} | {r['peft_exact_match']:.2f} "
                     f"| {r['base_exact_match']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per task, both ways (the budget)")
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--own-init", action="store_true",
                   help="rayft starts from its own initial adapter, not PEFT's (then seeds differ too)")
    p.add_argument("--output", type=Path, default=None, help="where rayft writes (a temporary dir if not given)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(args.config, args.steps, args.eval_examples, args.output or Path(tmp), not args.own_init)
    print(markdown(rows))


if __name__ == "__main__":
    main()
