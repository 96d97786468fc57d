"""A base model held in 4 or 8 bits (QLoRA): `base_model.quantization` as transformers'
`BitsAndBytesConfig` (bitsandbytes), or, for nf4 on the CPU, where bitsandbytes' 4-bit layers do not
train, torchao's PyTorch-native NF4 (`NF4Linear`). Adapters on such a base read its weights through
`rayft.adapters.dense`."""

from __future__ import annotations

import math

import torch
from torch import nn


class QuantizationError(ValueError):
    """A quantized base this machine cannot load (bitsandbytes missing)."""


def quantization_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool):
    """transformers' `BitsAndBytesConfig` for `base_model.quantization`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationError(f"base_model.quantization: {quantization} needs bitsandbytes "
                                "(pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)


def _torchao_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
        except ImportError:
            raise QuantizationError("base_model.quantization: nf4 on the CPU needs torchao's PyTorch-native NF4 "
                                    "(pip install torchao)") from None
    return linear_nf4, to_nf4


class NF4Linear(nn.Linear):
    """A linear layer whose frozen weight is torchao's NF4 tensor (4-bit NormalFloat in blocks of 64,
    its scales quantized again in blocks of up to 256): QLoRA's base on the CPU, where bitsandbytes'
    4-bit layers do not train. Its forward and backward dequantise the weight (`linear_nf4`)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        nn.Module.__init__(self)
        linear_nf4, to_nf4 = _torchao_nf4()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = linear.weight.numel()
        scaler_block = math.gcd(n // 64, 256)  # torchao wants the scales to fill whole blocks
        self.weight = nn.Parameter(to_nf4(linear.weight.detach().to(dtype), 64, scaler_block), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self._linear_nf4 = linear_nf4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_to_nf4(model: nn.Module, dtype: torch.dtype) -> int:
    """Put `NF4Linear`s in place of the model's adaptable linear layers (the output head stays);
    a layer whose weight is not whole blocks of 64 stays as it is. Returns how many were quantized."""
    from rayft.adapters.model import adaptable_linears

    done = 0
    for name, linear in adaptable_linears(model).items():
        if type(linear) is not nn.Linear or linear.weight.numel() % 64:
            continue
        model.set_submodule(name, NF4Linear(linear, dtype))
        done += 1
    return done
