"""What DoRA needs of a base layer's weight W, for a base in 4 or 8 bits too.

DoRA scales each output by `m / ‖W + s·BA‖` (row norms). A bitsandbytes layer keeps packed storage
in `.weight`; reading it as the matrix is the known trap (mLoRA's: a wrong norm, silently), and
dequantising it is no cure everywhere: on the CPU, bitsandbytes repacks a 4-bit layer's storage at
its first forward, after which `dequantize_4bit` returns another matrix than the one the layer
applies (seen with bitsandbytes 0.50.2: off by up to 0.6 on the tiny model, while PEFT's DoRA reads
it so). So for a quantized layer everything is taken from the layer's own outputs, the matrix it
really applies: `‖W_i‖²` once, through the identity, and each step
`‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²‖(BA)_i‖²`, where `W Aᵀ` is the layer run on
A's r rows.
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(linear: nn.Module) -> bool:
    return type(linear.weight).__name__ in ("Params4bit", "Int8Params")


def applied(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ as the layer computes it, its bias taken off."""
    out = linear(x)
    return out if linear.bias is None else out - linear.bias


def _eye_rows(n: int, start: int, stop: int, device) -> torch.Tensor:
    eye = torch.zeros(stop - start, n, device=device)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return eye


@torch.no_grad()
def row_norms_sq(linear: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """‖W_i‖² for every output i of a quantized layer, from its outputs on the identity (in chunks)."""
    n, device = linear.in_features, linear.weight.device
    total = torch.zeros(linear.out_features, device=device)
    for start in range(0, n, chunk):
        total += applied(linear, _eye_rows(n, start, min(n, start + chunk), device)).float().pow(2).sum(0)
    return total


@torch.no_grad()
def dora_norm(linear: nn.Module, W_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + scale·BA‖ by rows, W the quantized layer's applied matrix (`W_sq`: its `row_norms_sq`)."""
    WA = applied(linear, A).float().t()  # (out, r) = W Aᵀ
    A, B = A.float(), B.float()
    cross = (B * WA).sum(1)
    lora_sq = ((B @ (A @ A.t())) * B).sum(1)
    return (W_sq + 2 * scale * cross + scale * scale * lora_sq).clamp(min=0).sqrt()


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as a float (out, in) matrix: itself, or for a quantized layer the matrix it
    applies, read through the identity (for tests and one-off uses: it costs a full-size copy)."""
    if is_quantized(linear):
        n = linear.in_features
        return applied(linear, _eye_rows(n, 0, n, linear.weight.device)).float().t().contiguous()
    return linear.weight
