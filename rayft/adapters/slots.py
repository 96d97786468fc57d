"""Preallocated stacked storage for the LoRA adapters of one layer and one rank.

As vLLM's `lora_a_stacked`: every adapter of rank r on a layer keeps its A and B in one slot of
two stacked tensors, A (S, r, in) and B (S, out, r), so a forward over many adapters indexes the
stack (a view when their slots are adjacent) instead of stacking K tensors anew in every layer.

Training keeps PEFT's interface: each adapter's `lora_A` / `lora_B` is an `nn.Parameter` that
shares its slot's memory, so optimisers, state dicts and checkpoints see ordinary per-adapter
tensors, and an optimiser step writes straight into the stack. The forward reads the stack itself
(a leaf that requires grad while any of its adapters trains), so the backward writes the stack's
`.grad`; a hook then hands each trainable adapter its slot of it, as that parameter's `.grad` (a
view, or added to the one it holds: accumulation), and clears the stack's, so `.grad` behaves as
on any parameter (set to None, it starts afresh). Loading weights into an adapter
(`AdapterModel.load_adapter_state`) writes its slot in place through the same parameters; a freed
slot is reused by the next adapter; capacity doubles when full, re-pointing every adapter at the
new storage.
"""

from __future__ import annotations

import torch
from torch import nn


def _normal_tensors(method):
    """Run outside inference mode: a serving step loads adapters under it, and storage made or
    touched there would become inference tensors that training can no longer update in place."""

    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return run


class LoraStack:
    def __init__(self, r: int, in_features: int, out_features: int, device, capacity: int = 4):
        self.r, self.in_features, self.out_features = r, in_features, out_features
        self.params: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # slot -> (lora_A, lora_B)
        with torch.inference_mode(False):
            self._set_storage(torch.zeros(capacity, r, in_features, device=device),
                              torch.zeros(capacity, out_features, r, device=device))

    def _set_storage(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B, self._index, self._hooked = A, B, {}, False

    def _hand_out(self, stacked: torch.Tensor, side: int) -> None:
        """After a backward: each trainable slot's gradient to its parameter, the stack's cleared."""
        for slot, pair in self.params.items():
            p = pair[side]
            if p.requires_grad:
                g = stacked.grad[slot]
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g
        stacked.grad = None

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    def __len__(self) -> int:
        return len(self.params)

    @_normal_tensors
    def add(self, A: torch.Tensor, B: torch.Tensor) -> tuple[int, nn.Parameter, nn.Parameter]:
        """Put an adapter's A (r, in) and B (out, r) in a free slot; returns (slot, lora_A, lora_B),
        the parameters sharing that slot's memory."""
        free = next((s for s in range(self.capacity) if s not in self.params), None)
        if free is None:
            free = self.capacity
            self._grow(2 * self.capacity)
        with torch.no_grad():
            self.A[free].copy_(A)
            self.B[free].copy_(B)
        pa, pb = nn.Parameter(self.A.detach()[free]), nn.Parameter(self.B.detach()[free])
        self.params[free] = (pa, pb)
        self._refresh_requires_grad()
        return free, pa, pb

    @_normal_tensors
    def remove(self, slot: int) -> None:
        pa, pb = self.params.pop(slot)
        with torch.no_grad():  # a freed slot holds nothing of the adapter that left
            self.A[slot].zero_()
            self.B[slot].zero_()
        for p in (pa, pb):  # the departed adapter's tensors keep their values, in memory of their own
            p.data = p.data.clone()
        self._refresh_requires_grad()

    @_normal_tensors
    def _grow(self, capacity: int) -> None:
        grown = []
        for old in (self.A, self.B):
            new = torch.zeros(capacity, *old.shape[1:], device=old.device)
            with torch.no_grad():
                new[: self.capacity].copy_(old)
            grown.append(new)
        self._set_storage(*grown)
        for slot, (pa, pb) in self.params.items():  # same Parameter objects: optimiser state stays theirs
            pa.data, pb.data = self.A.detach()[slot], self.B.detach()[slot]
        self._refresh_requires_grad()

    def set_trainable(self, slot: int, trainable: bool) -> None:
        for p in self.params[slot]:
            p.requires_grad_(trainable)
        self._refresh_requires_grad()

    def _refresh_requires_grad(self) -> None:
        trains = any(p.requires_grad for pair in self.params.values() for p in pair)
        self.A.requires_grad_(trains)
        self.B.requires_grad_(trains)
        if trains and not self._hooked:  # a hook needs a tensor that requires grad
            for side, t in enumerate((self.A, self.B)):
                t.register_post_accumulate_grad_hook(lambda t, side=side: self._hand_out(t, side))
            self._hooked = True

    def weights(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the given slots, stacked (K, r, in), (K, out, r): a view when they are adjacent."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return self.A[first : first + len(slots)], self.B[first : first + len(slots)]
        key = tuple(slots)
        if key not in self._index:
            self._index[key] = torch.tensor(slots, device=self.A.device)
        idx = self._index[key]
        return self.A.index_select(0, idx), self.B.index_select(0, idx)
