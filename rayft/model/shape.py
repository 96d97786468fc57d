"""A base model's shape for the memory model, read from its real module tree.

The model is built from its config on the meta device (no weights, no memory, milliseconds), and
its adaptable linear layers are listed by the very function the adapter injection uses, so the
planner sizes exactly the layers an adapter will get, whatever the model family names them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from rayft.adapters.model import adaptable_linears, left_out_of_all_linear, linear_features
from rayft.config import BaseModelConfig
from rayft.scheduler.memory import DTYPE_BYTES, ModelShape, quantized_weight_bytes

# what the plan assumes for dtype "auto": the GPU replicas' choice (rayft.model.load.resolve_dtype)
PLANNING_DTYPE = "bfloat16"


class ModelShapeError(ValueError):
    """A base model whose config cannot be read or built: the message names the model."""


def hf_config(path: str) -> PretrainedConfig:
    """The config of a local model directory or a hub id (from the Hugging Face cache when offline)."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelShapeError(
            f"base model {path}: cannot read its config (a local directory with config.json, or a hub id "
            f"the Hugging Face hub or its cache has): {e}") from None


def shape_from_config(config: PretrainedConfig, dtype: str = PLANNING_DTYPE) -> ModelShape:
    """The ModelShape of the causal LM `config` describes (its linears taken from the module tree)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelShapeError(f"base model of type {config.model_type!r}: cannot build it as a causal LM: {e}") from None
    linears = tuple((name, *linear_features(m)) for name, m in adaptable_linears(model).items())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(hidden=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
                      params=sum(p.numel() for p in model.parameters()), linears=linears,
                      dtype_bytes=DTYPE_BYTES[dtype], left_out=tuple(left_out_of_all_linear(model).items()))


def model_shape(base: BaseModelConfig) -> ModelShape:
    """The shape of a run's base model, at the dtype it will be trained in."""
    dtype = base.dtype if base.dtype in DTYPE_BYTES else PLANNING_DTYPE
    shape = shape_from_config(hf_config(base.path), dtype)
    return replace(shape, linear_bytes=quantized_weight_bytes(base.quantization, base.double_quant))
