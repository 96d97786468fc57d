"""Load the frozen base: a Hugging Face causal LM from a local directory or a hub id."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from rayft.config import BaseModelConfig
from rayft.model.stages import StageSpec, check_stageable, stage_class

log = logging.getLogger(__name__)


def resolve_device(cfg: BaseModelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_dtype(cfg: BaseModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if resolve_device(cfg) == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def ensure_model(cfg: BaseModelConfig) -> None:
    """Build the model at cfg.path if it comes from a GGUF file and was not built from this very
    file, or if it is absent and `make_if_missing` names one (the tiny model, SmolLM2)."""
    if cfg.gguf is not None:
        from rayft.model.gguf import ensure_gguf_model

        ensure_gguf_model(cfg.gguf, cfg.path, log=log.info)
        return
    if (Path(cfg.path) / "config.json").is_file():
        return
    if cfg.make_if_missing == "tiny":
        from rayft.model.tiny import build_tiny_model

        log.info("building the tiny model at %s", cfg.path)
        build_tiny_model(cfg.path)
    elif cfg.make_if_missing == "smollm2":
        from rayft.model.gguf import ensure_gguf_model, smollm2_gguf_file

        log.info("building SmolLM2-135M-Instruct at %s from its GGUF file", cfg.path)
        ensure_gguf_model(smollm2_gguf_file(), cfg.path, log=log.info)


def load_tokenizer(cfg: BaseModelConfig):
    """The base model's tokenizer as training uses it (padding with eos where it has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def supported_attention(config, requested: str) -> str:
    """The attention to build the model with: the one asked for if its architecture has it, else
    eager (as transformers itself picks when none is asked for). Gemma2, for one, has no sdpa and
    would raise while being built. Raises a ValueError naming the model type if it is unknown."""
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"model_type {config.model_type!r} is not a causal language model transformers knows") from None
    if requested == "sdpa" and not getattr(model_class, "_supports_sdpa", False):
        log.warning("%s has no sdpa attention: using eager", model_class.__name__)
        return "eager"
    return requested


def load_base_model(cfg: BaseModelConfig, stage: StageSpec | None = None):
    """(model, tokenizer): weights frozen, in eval mode, on the configured device and dtype (its
    linear layers in 4 or 8 bits with `quantization`, `rayft.model.quantized`). With
    `stage`, only that pipeline stage's weights are read (`rayft.model.stages`), and the first item
    is the `StageModel`."""
    ensure_model(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    tokenizer = load_tokenizer(cfg)
    config = AutoConfig.from_pretrained(cfg.path)
    attention = supported_attention(config, cfg.attn_implementation)
    if cfg.quantization is not None:
        if stage is not None:
            raise ValueError("base_model.quantization: not on pipeline stages yet; use one-stage replicas")
        from rayft.model.quantized import QuantizationError, quantization_config, quantize_to_nf4

        compute = dtype if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)
        if cfg.quantization in ("nf4", "fp4") and device == "cpu":
            # bitsandbytes' 4-bit layers do not train on the CPU (0.50.2: after their first forward
            # they pass no gradient to their input): torchao's NF4 there; it has no fp4
            if cfg.quantization == "fp4":
                raise QuantizationError("base_model.quantization: fp4 on the CPU: bitsandbytes' 4-bit layers do "
                                        "not train there and PyTorch has no native fp4; use nf4 (torchao's) or int8")
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attention)
            quantize_to_nf4(model, compute)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, dtype=dtype, attn_implementation=attention, device_map={"": device},
                quantization_config=quantization_config(cfg.quantization, compute, cfg.double_quant))
    elif stage is None:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attention)
    else:
        model = load_stage(cfg.path, config, stage, dtype, attention)
    if cfg.quantization is None:  # a quantized model is placed as it loads (and cannot be moved)
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return (model if stage is None else model.stage), tokenizer


def load_stage(path: str, config, stage: StageSpec, dtype: torch.dtype, attention: str = "eager"):
    """A transformers model built cut down to `stage` (`stage_class`), only its weights read from
    `path`; `.stage` is its `StageModel`."""
    check_stageable(config)
    tied = config.tie_word_embeddings
    embedding_key = _embedding_key(config) if tied else None
    cls = stage_class(AutoModelForCausalLM._model_mapping[type(config)], stage)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists every other stage's weight as unexpected
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attention,
                                          output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    head = model.get_output_embeddings()
    if stage.last and not stage.first and tied:
        head_key = next(n for n, p in model.named_parameters() if p is head.weight)
        missing.discard(head_key)
        with torch.no_grad():
            head.weight.copy_(read_checkpoint_tensor(path, embedding_key))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks weights of stage {stage.index}: {', '.join(sorted(missing))}")
    return model


def _embedding_key(config) -> str:
    """The input embedding's parameter name, from a weightless build of the model."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    weight = skeleton.get_input_embeddings().weight
    return next(n for n, p in skeleton.named_parameters() if p is weight)


def read_checkpoint_tensor(path: str | Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint directory (one file or shards with an index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text())["weight_map"].get(key)
    else:
        file = "model.safetensors"
    if file is None or not (path / file).is_file():
        raise ValueError(f"{path}: no safetensors file holds {key!r}")
    with safe_open(str(path / file), framework="pt") as f:
        if key not in f.keys():
            raise ValueError(f"{path / file}: no tensor {key!r}")
        return f.get_tensor(key)
