"""A base model held in 4 or 8 bits (QLoRA), through bitsandbytes as transformers loads it:
`base_model.quantization` as transformers' `BitsAndBytesConfig`. Adapters on such a base read its
weights through `rayft.adapters.dense`."""

from __future__ import annotations

import torch


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
