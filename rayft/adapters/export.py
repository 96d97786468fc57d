"""An adapter folded into its base, written as a whole Hugging Face model directory.

The result is what any tool that reads a transformers model takes (vLLM, TGI, llama.cpp's
converter): safetensors shards, config, tokenizer, with every adapted layer's weight replaced by
W + ΔW (DoRA: rescaled by its magnitudes; VeRA: its scaled projections), computed in float32 and
written in the dtype asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayft.adapters.model import AdapterModel, _conv1d, adaptable_linears
from rayft.adapters.peft_format import CONFIG_FILE, load_adapter
from rayft.atomic import atomic_dir


class ExportError(ValueError):
    """An adapter that cannot be exported as asked: the message names the file or the setting."""


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  dtype: str = "auto") -> Path:
    """Fold the PEFT-format adapter at `adapter_dir` into `base_model` (default: the base its
    adapter_config.json names) and write the model to `out_dir`. `dtype`: float32, bfloat16,
    float16, or auto (the base's own)."""
    adapter_dir = Path(adapter_dir)
    try:
        named = json.loads((adapter_dir / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except FileNotFoundError:
        raise ExportError(f"{adapter_dir / CONFIG_FILE}: not found (not a PEFT adapter directory)") from None
    base = base_model or named
    if not base:
        raise ExportError(f"{adapter_dir / CONFIG_FILE}: names no base model; give one (--base-model)")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise ExportError(f"base model {base}: cannot load it: {e}") from None
    if dtype == "auto":  # the base's own, as its config.json gives it
        saved = getattr(model.config, "dtype", None)
        target = getattr(torch, saved) if isinstance(saved, str) else (saved or torch.float32)
    else:
        target = getattr(torch, dtype)
    originals = dict(adaptable_linears(model))
    am = AdapterModel(model)
    load_adapter(am, adapter_dir, "export")
    with torch.no_grad():
        for name, layer in am.layers().items():
            merged = layer.adapters["export"].merged_weight(layer.base.weight.data.float())
            original = originals[name]
            original.weight.data = merged.t().contiguous() if isinstance(original, _conv1d()) else merged
            model.set_submodule(name, original)
    model.to(target)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
