"""Merging LoRA adapters of one base, each layer's result defined on the dense deltas.

Every adapter i holds, per layer, ΔW_i = s_i·B_i·A_i (s_i its own scale: alpha/r, or alpha/√r with
rsLoRA, per layer where PEFT's rank/alpha patterns say so). A method combines the ΔW_i of a layer
(an adapter that does not target it adds nothing), with weights w_i:

- `cat`: Σ w_i·ΔW_i exactly, as a LoRA of rank Σ r_i (A_i stacked, w_i·s_i·B_i side by side).
- `linear`: the same sum (exact, as `cat`), or truncated to `rank` when one is given. (PEFT's
  `linear` averages the A's and the B's apart, which is not Σ w_i·ΔW_i.)
- `svd`: the same sum, truncated to `rank` (default: the largest r_i) by its SVD.
- `ties`: each ΔW_i pruned to its `density` largest entries, a majority sign elected per entry
  (`total`: of their sum; `frequency`: of their signs), the weighted entries carrying it averaged
  (as PEFT's `merge_utils.ties`, which our test compares with).
- `dare_linear` / `dare_ties`: entries dropped at random (kept with probability `density`, seeded
  per layer), the kept ones rescaled by 1/density, then summed / merged as TIES.
- `magnitude_prune`: each ΔW_i pruned to its `density` largest entries, then summed.
The dense methods' results (svd, ties, dare, magnitude_prune) are cut to `rank` by their SVD, each
layer's relative truncation error reported. The result is an ordinary PEFT LoRA adapter (scale 1).
DoRA and VeRA adapters are refused: DoRA's magnitudes rescale each merged layer by its own norm,
which none of these methods defines, and VeRA's shared projections are not per-adapter matrices.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft.adapters.peft_format import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, check_finite
from rayft.adapters.rng import layer_seed
from rayft.atomic import atomic_dir
from rayft.config import MERGE_METHODS

METHODS = MERGE_METHODS


class MergeError(ValueError):
    """Adapters that cannot be merged as asked: the message names the file or the setting."""


@dataclass
class LoraFile:
    """A PEFT-format LoRA adapter as merging reads it: per layer (A, B, scale)."""

    path: Path
    config: dict
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    def delta(self, layer: str) -> torch.Tensor:
        A, B, scale = self.layers[layer]
        return scale * (B @ A)


def _pattern_value(patterns: dict, layer: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def lora_scale(config: dict, layer: str, r: int) -> float:
    """A PEFT LoRA config's scale on one layer: alpha/r, or alpha/√r with rsLoRA (alpha_pattern may
    set the layer's alpha)."""
    alpha = _pattern_value(config.get("alpha_pattern"), layer, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise MergeError(f"{path / CONFIG_FILE}: not found (not a PEFT adapter directory)") from None
    except json.JSONDecodeError as e:
        raise MergeError(f"{path / CONFIG_FILE}: malformed JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters merge "
                         "(VeRA's projections are shared, not the adapter's own matrices)")
    if config.get("use_dora"):
        raise MergeError(f"{path}: a DoRA adapter; its magnitude vectors rescale each merged layer by that layer's "
                         "norm, which these methods do not define: merge it into the base (rayft export) instead")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MergeError(f"{weights}: not found")
    raw = load_file(str(weights))
    out = LoraFile(path, config)
    for key, A in raw.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[len(KEY_PREFIX):-len(".lora_A.weight")]
        B = raw.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if B is None:
            raise MergeError(f"{weights}: {layer} has lora_A but no lora_B")
        out.layers[layer] = (A.float(), B.float(), lora_scale(config, layer, A.shape[0]))
    if not out.layers:
        raise MergeError(f"{weights}: no LoRA layers")
    return out


def _prune_by_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its `density` share of largest-magnitude entries zeroed."""
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().flatten(), int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _drop_at_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _ties_merge(tensors: torch.Tensor, w: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES's merge of stacked (pruned) task tensors: a sign per entry elected by the unweighted
    tensors (`total`: their sum's; `frequency`: their signs' count; + where tied), then per entry the
    mean of the weighted tensors that carry that sign."""
    signs = tensors.sign()
    votes = tensors.sum(0) if majority_sign == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    return (tensors * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(deltas: list[torch.Tensor], weights: list[float], method: str, density: float = 1.0,
            majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """A dense method's result for one layer, from its adapters' ΔW_i and weights."""
    w = torch.tensor(weights, dtype=deltas[0].dtype).view(-1, *[1] * deltas[0].dim())
    stacked = torch.stack(deltas)
    if method in ("linear", "cat", "svd"):
        return (stacked * w).sum(0)
    if method == "magnitude_prune":
        return (torch.stack([_prune_by_magnitude(d, density) for d in deltas]) * w).sum(0)
    if method == "ties":
        return _ties_merge(torch.stack([_prune_by_magnitude(d, density) for d in deltas]), w, majority_sign)
    if method in ("dare_linear", "dare_ties"):
        dropped = torch.stack([_drop_at_random(d, density, generator) for d in deltas])
        return (dropped * w).sum(0) if method == "dare_linear" else _ties_merge(dropped, w, majority_sign)
    raise MergeError(f"method {method!r}: use one of {', '.join(METHODS)}")


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error): B·A the best rank-`rank` approximation of `delta` (its SVD)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.numel())
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    total = float(S.pow(2).sum())
    error = math.sqrt(float(S[rank:].pow(2).sum()) / total) if total > 0 else 0.0
    return A, B, error


@dataclass
class MergeResult:
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer (A, B) at scale 1
    config: dict  # the PEFT adapter_config.json to write
    errors: dict[str, float]  # per layer, the relative truncation error (0 where exact)

    def delta(self, layer: str) -> torch.Tensor:
        A, B = self.layers[layer]
        return B @ A


def merge(adapters: list[LoraFile], method: str, weights: list[float] | None = None, density: float = 1.0,
          rank: int | None = None, majority_sign: str = "total", seed: int = 0) -> MergeResult:
    """The merge of `adapters` by `method` (see the module docstring), as one LoRA adapter."""
    if method not in METHODS:
        raise MergeError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if not adapters:
        raise MergeError("no adapters to merge")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise MergeError(f"weights: {len(weights)} given for {len(adapters)} adapters")
    if not 0 < density <= 1:
        raise MergeError(f"density: {density} is not in (0, 1]")
    if majority_sign not in ("total", "frequency"):
        raise MergeError(f"majority_sign: {majority_sign!r}: use total or frequency")
    if rank is not None and rank < 1:
        raise MergeError(f"rank: {rank} is not a positive rank")
    bases = {a.config.get("base_model_name_or_path") for a in adapters}
    if len(bases) > 1:
        raise MergeError(f"adapters of different base models: {', '.join(sorted(map(str, bases)))}")
    fan = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(fan) > 1:
        raise MergeError("adapters disagree on fan_in_fan_out (Conv1D and Linear layers of different models)")
    names = sorted({layer for a in adapters for layer in a.layers})
    exact = method == "cat" or (method == "linear" and rank is None)
    default_rank = max(a.layers[layer][0].shape[0] for a in adapters for layer in a.layers)
    out, errors = {}, {}
    for layer in names:
        mine = [(a, w) for a, w in zip(adapters, weights) if layer in a.layers]
        shapes = {tuple(a.delta(layer).shape) for a, _ in mine}
        if len(shapes) > 1:
            raise MergeError(f"layer {layer}: the adapters' deltas differ in shape {sorted(shapes)} (other bases?)")
        if exact:  # Σ w_i·s_i·B_i·A_i = [w_1·s_1·B_1, ...] · [A_1; ...]
            A = torch.cat([a.layers[layer][0] for a, _ in mine])
            B = torch.cat([w * a.layers[layer][2] * a.layers[layer][1] for a, w in mine], dim=1)
            out[layer], errors[layer] = (A, B), 0.0
            continue
        generator = torch.Generator().manual_seed(layer_seed(seed, f"merge:{layer}"))
        dense = combine([a.delta(layer) for a, _ in mine], [w for _, w in mine], method, density, majority_sign,
                        generator)
        A, B, errors[layer] = low_rank(dense, rank or default_rank)
        out[layer] = (A, B)
    # one rank for every layer (zero rows and columns change no delta), alpha = r: scale 1
    r = max(A.shape[0] for A, _ in out.values())
    padded = {}
    for layer, (A, B) in out.items():
        k = r - A.shape[0]
        padded[layer] = (torch.cat([A, A.new_zeros(k, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], k)], dim=1))
    config = {**adapters[0].config, "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "target_modules": names}
    return MergeResult(padded, config, errors)


def write_lora(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, out: str | Path) -> Path:
    """A PEFT LoRA adapter directory from per-layer (A, B) and its adapter_config.json."""
    state = {}
    for layer, (A, B) in layers.items():
        state[f"{KEY_PREFIX}{layer}.lora_A.weight"] = A.float().contiguous()
        state[f"{KEY_PREFIX}{layer}.lora_B.weight"] = B.float().contiguous()
    check_finite(state, out)
    with atomic_dir(Path(out)) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def save_merge(result: MergeResult, out: str | Path) -> Path:
    """Write the merge as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."""
    return write_lora(result.layers, result.config, out)
