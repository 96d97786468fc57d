"""A linear layer's weight as an ordinary float matrix, for a base in 4 or 8 bits too.

DoRA needs the base weight itself (its row norms `‖W + s·BA‖`), and so does folding an adapter in.
A bitsandbytes layer (`base_model.quantization`) keeps packed storage in `.weight`; reading that as
the matrix is the known trap (mLoRA's: a wrong norm, silently). It is dequantised here, as PEFT
dequantises it.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED = ("Params4bit", "Int8Params", "NF4Tensor")  # bitsandbytes' 4- and 8-bit, torchao's NF4


def is_quantized(linear: nn.Module) -> bool:
    return type(linear.weight).__name__ in QUANTIZED


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as a float (out, in) matrix: itself, or dequantised from 4 or 8 bits."""
    w = linear.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    if kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        scb = w.SCB if getattr(w, "SCB", None) is not None else linear.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb)
    if kind == "NF4Tensor":
        return w.get_original_weight()
    return w
