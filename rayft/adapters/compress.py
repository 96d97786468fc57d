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

from rayft import names
from rayft.adapters.merge import LoraFile, MergeError, lora_scale, write_lora
from rayft.atomic import atomic_dir
from rayft.layout import SUBSPACE_BASIS as BASIS_FILE
from rayft.layout import SUBSPACE_META as META_FILE

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
            A = self.matrix(name, layer, "A")
            out.layers[layer] = (A, self.matrix(name, layer, "B"), lora_scale(self.configs[name], layer, A.shape[0]))
        return out

    def scales(self, layer: str) -> torch.Tensor:
        """Each adapter's LoRA scale on `layer` (from its own config), in the order of `loadings`."""
        r = self.shapes[(layer, "A")][0]
        return torch.tensor([lora_scale(self.configs[n], layer, r) for n in self.loadings])

    def project(self, name: str, adapter: LoraFile) -> None:
        """Add `adapter` by its loadings on the present basis (the basis unchanged)."""
        if not names.is_name(name):  # a served model id: the server's rule
            raise MergeError(f"adapter name {names.shown(name)} is not allowed: use {names.RULE}")
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
    """A compressed store as `save_subspace` wrote it; a MergeError naming the file and what in it
    is wrong (a missing tensor, a shape that disagrees with subspace.json, a name that breaks the
    rule, weights that are not finite)."""
    path = Path(path)
    meta_file, basis_file = path / META_FILE, path / BASIS_FILE
    try:
        meta = json.loads(meta_file.read_text())
        layers, shapes_of, configs = meta["layers"], meta["shapes"], meta["adapters"]
    except FileNotFoundError:
        raise MergeError(f"{meta_file}: not found (not a compressed store)") from None
    except (ValueError, TypeError, KeyError) as e:  # malformed JSON, or a key missing
        raise MergeError(f"{meta_file}: not a compressed store's description ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(basis_file))
    except FileNotFoundError:
        raise MergeError(f"{basis_file}: not found") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise MergeError(f"{basis_file}: cannot be read ({type(e).__name__}: {e})") from None
    if not configs:
        raise MergeError(f"{meta_file}: holds no adapters")
    for name in configs:
        if not names.is_name(name):
            raise MergeError(f"{meta_file}: adapter name {names.shown(name)} is not allowed: use {names.RULE}")

    def tensor(key: str, shape: tuple) -> torch.Tensor:
        t = tensors.get(key)
        if t is None:
            raise MergeError(f"{basis_file}: no tensor {key}")
        if tuple(t.shape) != shape:
            raise MergeError(f"{basis_file}: {key} has shape {tuple(t.shape)}, subspace.json implies {shape}")
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"{basis_file}: {key} is not finite (NaN or infinity)")
        return t

    keys = [(layer, side) for layer in layers for side in SIDES]
    try:
        shapes = {k: tuple(int(n) for n in shapes_of[f"{k[0]}.{k[1]}"]) for k in keys}
    except (KeyError, TypeError, ValueError) as e:
        raise MergeError(f"{meta_file}: no usable shape for {e}") from None
    components = {}
    for k in keys:
        c = tensors.get(f"components.{k[0]}.{k[1]}")
        size = shapes[k][0] * shapes[k][1]
        components[k] = tensor(f"components.{k[0]}.{k[1]}", (c.shape[0] if c is not None and c.dim() == 2 else 0, size))
    space = Subspace(layers, components, {k: tensor(f"means.{k[0]}.{k[1]}", (shapes[k][0] * shapes[k][1],))
                                          for k in keys}, shapes)
    for name, config in configs.items():
        space.configs[name] = config
        space.loadings[name] = {k: tensor(f"loadings.{name}.{k[0]}.{k[1]}", (components[k].shape[0],)) for k in keys}
    return space


def decompress(space: Subspace, out: str | Path) -> dict[str, Path]:
    """Every adapter of the subspace written back as a PEFT adapter, at out/<name>."""
    written = {}
    for name in space.loadings:
        adapter = space.reconstruct(name)
        layers = {layer: (A, B) for layer, (A, B, _) in adapter.layers.items()}
        written[name] = write_lora(layers, space.configs[name], Path(out) / name)
    return written
