"""Many LoRA adapters of one base in one shared subspace (as vlora does), and back.

Per layer and per side (A and B), the adapters' matrices are flattened into the rows of an N × D
matrix, centred on their mean, and its SVD gives a basis of k components (k fixed, or per layer and
side the smallest that explains a share of the variance). Each adapter is then its k loadings per
layer and side: N·k numbers plus one k × D basis, where the adapters held N·D. An adapter is
reconstructed as loadings · basis + mean. A new adapter can be projected onto the basis (its
loadings alone), or absorbed: every adapter reconstructed, the new one added, the basis recomputed
and all re-projected. The adapters must share their rank and layers (the basis spans matrices of
one shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft.adapters.merge import LoraFile, MergeError, write_lora
from rayft.atomic import atomic_dir

BASIS_FILE, META_FILE = "basis.safetensors", "subspace.json"
SIDES = ("A", "B")


@dataclass
class Subspace:
    layers: list[str]
    components: dict[tuple[str, str], torch.Tensor]  # (layer, side) -> (k, D)
    means: dict[tuple[str, str], torch.Tensor]  # (layer, side) -> (D,)
    shapes: dict[tuple[str, str], tuple[int, int]]
    loadings: dict[str, dict[tuple[str, str], torch.Tensor]] = field(default_factory=dict)  # adapter -> (k,)
    configs: dict[str, dict] = field(default_factory=dict)  # adapter -> its adapter_config.json

    def matrix(self, name: str, layer: str, side: str) -> torch.Tensor:
        key = (layer, side)
        return (self.loadings[name][key] @ self.components[key] + self.means[key]).reshape(self.shapes[key])

    def reconstruct(self, name: str) -> LoraFile:
        if name not in self.loadings:
            raise MergeError(f"no adapter {name!r} in the subspace (have {sorted(self.loadings)})")
        out = LoraFile(Path(name), self.configs[name])
        for layer in self.layers:
            out.layers[layer] = (self.matrix(name, layer, "A"), self.matrix(name, layer, "B"), 1.0)
        return out

    def project(self, name: str, adapter: LoraFile) -> None:
        """Add `adapter` by its loadings on the present basis (the basis unchanged)."""
        _check_fits(self, adapter)
        self.loadings[name] = {(layer, side): (_side(adapter, layer, side).flatten() - self.means[(layer, side)])
                               @ self.components[(layer, side)].T for layer in self.layers for side in SIDES}
        self.configs[name] = adapter.config

    def stored_numbers(self) -> int:
        return (sum(c.numel() + self.means[k].numel() for k, c in self.components.items())
                + sum(v.numel() for loads in self.loadings.values() for v in loads.values()))

    def original_numbers(self) -> int:
        return len(self.loadings) * sum(h * w for h, w in self.shapes.values())


def _side(adapter: LoraFile, layer: str, side: str) -> torch.Tensor:
    A, B, _ = adapter.layers[layer]
    return A if side == "A" else B


def _check_fits(space: Subspace, adapter: LoraFile) -> None:
    for layer in space.layers:
        if layer not in adapter.layers:
            raise MergeError(f"{adapter.path}: no layer {layer} (the subspace's adapters all have it)")
        for side in SIDES:
            if tuple(_side(adapter, layer, side).shape) != space.shapes[(layer, side)]:
                raise MergeError(f"{adapter.path}: {layer} {side} is {tuple(_side(adapter, layer, side).shape)}, "
                                 f"the subspace's {space.shapes[(layer, side)]} (adapters of one rank only)")


def _components(singular: torch.Tensor, k: int | None, variance: float | None) -> int:
    if k is not None:
        return min(k, singular.numel())
    share = (singular.pow(2) / singular.pow(2).sum().clamp(min=1e-30)).cumsum(0)
    above = (share >= variance).nonzero()
    return int(above[0]) + 1 if above.numel() else singular.numel()


def compress(adapters: dict[str, LoraFile], components: int | None = None, variance: float | None = None) -> Subspace:
    """The adapters (name -> adapter) in one subspace: `components` per layer and side, or the fewest
    explaining `variance` of each layer and side."""
    if (components is None) == (variance is None):
        raise MergeError("give the number of components or the variance to explain (one of them)")
    if components is not None and components < 1:
        raise MergeError(f"components: {components} is not a positive count")
    if variance is not None and not 0 < variance <= 1:
        raise MergeError(f"variance: {variance} is not in (0, 1]")
    if len(adapters) < 1:
        raise MergeError("no adapters to compress")
    first = next(iter(adapters.values()))
    layers = sorted(first.layers)
    shapes = {(layer, side): tuple(_side(first, layer, side).shape) for layer in layers for side in SIDES}
    space = Subspace(layers, {}, {}, shapes)
    for adapter in adapters.values():
        _check_fits(space, adapter)
        if sorted(adapter.layers) != layers:
            raise MergeError(f"{adapter.path}: targets other layers than {first.path} (one set of layers only)")
    for layer in layers:
        for side in SIDES:
            rows = torch.stack([_side(a, layer, side).flatten() for a in adapters.values()])
            mean = rows.mean(0)
            _, S, Vh = torch.linalg.svd(rows - mean, full_matrices=False)
            k = _components(S, components, variance)
            space.components[(layer, side)], space.means[(layer, side)] = Vh[:k], mean
    for name, adapter in adapters.items():
        space.project(name, adapter)
    return space


def absorb(space: Subspace, name: str, adapter: LoraFile, components: int | None = None,
           variance: float | None = None) -> Subspace:
    """A new subspace of every adapter (as reconstructed) and `adapter`, the basis recomputed."""
    everyone = {n: space.reconstruct(n) for n in space.loadings}
    everyone[name] = adapter
    if components is None and variance is None:
        components = max(c.shape[0] for c in space.components.values())
    new = compress(everyone, components, variance)
    new.configs.update({n: space.configs[n] for n in space.loadings})
    return new


def reconstruction_errors(space: Subspace, adapters: dict[str, LoraFile]) -> dict[str, float]:
    """Per adapter, ‖reconstructed − original‖ / ‖original‖ over all its A and B matrices."""
    out = {}
    for name, adapter in adapters.items():
        num = den = 0.0
        for layer in space.layers:
            for side in SIDES:
                original = _side(adapter, layer, side)
                num += float((space.matrix(name, layer, side) - original).pow(2).sum())
                den += float(original.pow(2).sum())
        out[name] = (num / den) ** 0.5 if den else 0.0
    return out


def save_subspace(space: Subspace, out: str | Path) -> Path:
    tensors = {}
    for (layer, side), c in space.components.items():
        tensors[f"components.{layer}.{side}"] = c.contiguous()
        tensors[f"means.{layer}.{side}"] = space.means[(layer, side)].contiguous()
    for name, loads in space.loadings.items():
        for (layer, side), v in loads.items():
            tensors[f"loadings.{name}.{layer}.{side}"] = v.contiguous()
    meta = {"layers": space.layers, "adapters": space.configs,
            "shapes": {f"{layer}.{side}": list(s) for (layer, side), s in space.shapes.items()}}
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / BASIS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def load_subspace(path: str | Path) -> Subspace:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise MergeError(f"{path / META_FILE}: not found (not a compressed store)") from None
    tensors = load_file(str(path / BASIS_FILE))
    layers = meta["layers"]
    keys = [(layer, side) for layer in layers for side in SIDES]
    space = Subspace(layers, {k: tensors[f"components.{k[0]}.{k[1]}"] for k in keys},
                     {k: tensors[f"means.{k[0]}.{k[1]}"] for k in keys},
                     {k: tuple(meta["shapes"][f"{k[0]}.{k[1]}"]) for k in keys})
    for name, config in meta["adapters"].items():
        space.configs[name] = config
        space.loadings[name] = {k: tensors[f"loadings.{name}.{k[0]}.{k[1]}"] for k in keys}
    return space


def decompress(space: Subspace, out: str | Path) -> dict[str, Path]:
    """Every adapter of the subspace written back as a PEFT adapter, at out/<name>."""
    written = {}
    for name in space.loadings:
        adapter = space.reconstruct(name)
        layers = {layer: (A, B) for layer, (A, B, _) in adapter.layers.items()}
        written[name] = write_lora(layers, space.configs[name], Path(out) / name)
    return written
