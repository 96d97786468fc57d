"""Held-out scores for an adapter or the bare base model: greedy exact match (SFT jobs), preference
accuracy (preference jobs)."""

from __future__ import annotations

import torch

from rayft.adapters import AdapterModel


@torch.no_grad()
def greedy_generate(am: AdapterModel, tokenizer, prompts: list[list[int]], adapter: str | None,
                    max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Left-padded batched greedy decoding with one adapter applied to every row (None: the base)."""
    model = am.model
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with am.use(adapter, rows=len(chunk)):
            gen = model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
        out.extend(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
    return out


@torch.no_grad()
def heldout_loss(am: AdapterModel, encoded: list, adapter: str | None, pad_id: int, batch_size: int = 32) -> float:
    """Token-mean cross entropy of the answer tokens (each example's loss_mask) of held-out
    examples, with one adapter on every row (None: the base); right-padded batches, in eval mode
    (no dropout), the model's mode restored after."""
    model = am.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e)) for e in chunk], device=device)
            attn = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk], device=device)
            # the token at t+1 is predicted at t, where it is an answer token
            scored = torch.tensor([list(e.loss_mask[1:]) + [False] * (width - len(e) + 1) for e in chunk],
                                  device=device)
            with am.use(adapter, rows=len(chunk)):
                logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += float(losses[scored[:, :-1]].sum())
            count += int(scored[:, :-1].sum())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def exact_match(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        return float("nan")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)


@torch.no_grad()
def preference_accuracy(am: AdapterModel, pairs: list, adapter: str | None, pad_id: int,
                        batch_size: int = 32) -> float:
    """The share of pairs (`EncodedPair`) whose chosen answer the model scores above the rejected one:
    a higher mean log-probability per answer token (length-normalised, so a shorter answer is not
    preferred for being short)."""
    if not pairs:
        return float("nan")
    model = am.model
    model.eval()
    device = next(model.parameters()).device
    sequences = [s for p in pairs for s in p.sequences]
    scores: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s.input_ids + [pad_id] * (width - len(s)) for s in chunk], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([s.loss_mask[1:] + [False] * (width - len(s)) for s in chunk], device=device)
        with am.use(adapter, rows=len(chunk)):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores += ((logps * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return sum(c > r for c, r in zip(scores[0::2], scores[1::2])) / len(pairs)
