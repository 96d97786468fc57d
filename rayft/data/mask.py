"""The attention mask that keeps packed examples from seeing each other.

Transformers passes a 4D mask through unchanged, so this is what a packed row needs under sdpa
and eager; position ids alone restart RoPE per example but do not block attention across them.
"""

from __future__ import annotations

import torch


def packed_attention_mask(
    seq_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> torch.Tensor | None:
    """[R, 1, L, L] mask: token t sees s iff s <= t and both belong to the same example.

    Padding (seq_id -1) sees only itself, so no query row is fully masked (which would give NaN).
    sdpa: bool (True = attend); eager: additive float of `dtype` (0 or finfo.min). None when no row
    holds more than one example: padding sits only at row ends, so plain causal attention is exact.
    """
    if not needs_packed_mask(seq_ids):
        return None
    return block_causal_mask(seq_ids, dtype=dtype, attn_implementation=attn_implementation)


def needs_packed_mask(seq_ids: torch.Tensor) -> bool:
    """True when some row holds more than one example (reads the tensor: call it on a CPU copy)."""
    return seq_ids.numel() > 0 and int(seq_ids.max()) > 0


def block_causal_mask(
    seq_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> torch.Tensor:
    """The [R, 1, L, L] mask itself, built wherever `seq_ids` lives (no host sync)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"packed_attention_mask supports 'sdpa' and 'eager', not {attn_implementation!r}")
    L = seq_ids.shape[1]
    q, k = seq_ids[:, :, None], seq_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_ids.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=seq_ids.device)
    allowed = ((q == k) & (q >= 0) & causal) | eye
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=seq_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
