"""An adapter's random streams: one per layer, derived from the job's seed and the layer's name.

A layer's init and its dropout masks are drawn from streams of its own, so they depend on nothing
but (seed, layer name): not on which other layers share the process. That is what lets a pipeline
stage, which holds only some of the layers, draw exactly what one process holding all of them
draws, and a job fused beside others draw what it draws alone.
"""

from __future__ import annotations

import hashlib

import torch


def layer_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named stream of a job (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}\0{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class AdapterRNG:
    """The dropout generators of one adapter, one per layer, made on first use; state by layer name."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", layers=None):
        self.seed = seed
        self.device = torch.device(device)
        self.layers = None if layers is None else frozenset(layers)  # the layers this process holds
        self._generators: dict[str, torch.Generator] = {}

    def init_generator(self, layer: str) -> torch.Generator:
        """A fresh CPU generator for the layer's initial weights."""
        return torch.Generator().manual_seed(layer_seed(self.seed, f"init:{layer}"))

    def dropout_generator(self, layer: str) -> torch.Generator:
        gen = self._generators.get(layer)
        if gen is None:
            gen = self._generators[layer] = torch.Generator(device=self.device)
            gen.manual_seed(layer_seed(self.seed, f"dropout:{layer}"))
        return gen

    def get_state(self) -> dict[str, torch.Tensor]:
        """The state of every stream drawn from so far (one never drawn from is at its seed)."""
        return {layer: g.get_state() for layer, g in self._generators.items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put every stream back where `state` has it, and the others at their seed. Streams of layers
        this process does not hold (a checkpoint of all stages, resumed on one) are left out."""
        if not isinstance(state, dict):
            raise TypeError("dropout RNG state must map layer names to generator states "
                            f"(got {type(state).__name__}: a checkpoint from before per-layer streams)")
        self._generators = {}
        for layer, s in state.items():
            if self.layers is None or layer in self.layers:
                self.dropout_generator(layer).set_state(s)
