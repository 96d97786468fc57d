"""Greedy exact match on held-out examples, for an adapter or the bare base model."""

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


def exact_match(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        return float("nan")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)
