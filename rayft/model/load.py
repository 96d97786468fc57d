"""Load the frozen base: a Hugging Face causal LM from a local directory or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rayft.config import BaseModelConfig
from rayft.model.stages import StageSpec, split_stage

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
    """(model, tokenizer): weights frozen, in eval mode, on the configured device and dtype. With
    `stage`, the model is cut down to that pipeline stage (`rayft.model.stages`) before it moves to
    the device, and the first item is the `StageModel`."""
    ensure_model(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    tokenizer = load_tokenizer(cfg)
    attention = supported_attention(AutoConfig.from_pretrained(cfg.path), cfg.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attention)
    part = None if stage is None else split_stage(model, stage)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return (model if part is None else part), tokenizer
