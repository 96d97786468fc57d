"""The per-layer weights of one adapter, one class per family.

Formulas follow PEFT so that adapters move between the two with identical outputs:
  LoRA / rsLoRA  delta = scale * B(A(drop(x)))                      scale = alpha/r or alpha/sqrt(r)
  DoRA           delta = (m/|W + s·BA| - 1)·W x + (m/|W + s·BA|)·s·B(A(drop(x)))   (norm detached)
  VeRA           delta = lambda_b * B_shared(lambda_d * A_shared(drop(x)))
  compressed     A_i = a_i·U_A + mean_A, B_i = b_i·U_B + mean_B  (one basis per layer, loadings per adapter)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayft.adapters.dense import dense_weight
from rayft.adapters.slots import LoraStack
from rayft.config import AdapterConfig


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


class LoraWeights(nn.Module):
    """LoRA, rsLoRA and DoRA: A (r, in), B (out, r), and DoRA's magnitude (out,).

    A and B live in a slot of the layer's stack for rank r (`LoraStack`); `lora_A` / `lora_B` are
    parameters sharing that slot's memory, and the forward reads the stack (`weights`), through
    which the gradient flows."""

    batchable = True  # plain LoRA of one rank shares one grouped computation with its peers

    def __init__(self, cfg: AdapterConfig, base: nn.Linear, stack: LoraStack, generator: torch.Generator | None = None):
        super().__init__()
        self.r, self.scale, self.p = cfg.r, cfg.scale, cfg.dropout
        # Drawn on the CPU from this layer's own stream (rayft.adapters.rng): the init depends on
        # nothing else created before it, alone or fused, on one process or on pipeline stages.
        A = torch.empty(cfg.r, base.in_features)
        if cfg.init == "gaussian":
            nn.init.normal_(A, std=1.0 / cfg.r, generator=generator)
        else:  # nn.Linear's default, as LoRA's reference code and PEFT do
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self._stack = [stack]  # a list keeps it off the module tree
        self.slot, self.lora_A, self.lora_B = stack.add(A, torch.zeros(base.out_features, cfg.r))
        self.use_dora = cfg.variant == "dora"
        if self.use_dora:
            self.batchable = False
            with torch.no_grad():  # a 4- or 8-bit base's weight dequantised (`rayft.adapters.dense`)
                norm = dense_weight(base).float().norm(dim=1)
            self.magnitude = nn.Parameter(norm)

    @property
    def stack(self) -> LoraStack:
        return self._stack[0]

    @property
    def group(self) -> tuple:
        return ("lora", self.r)  # adapters of one rank share the layer's stack for it

    def weights(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) read from the stack, so the gradient lands there."""
        stack = self.stack
        return stack.A[self.slot].to(dtype), stack.B[self.slot].to(dtype)

    def release(self) -> None:
        """Give the slot back (the adapter leaves the layer)."""
        self.stack.remove(self.slot)

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        self.stack.set_trainable(self.slot, requires_grad)
        return self

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def delta(self, x, base_out, base: nn.Linear, training: bool, gen) -> torch.Tensor:
        A, B = self.weights(x.dtype)
        if not self.use_dora:
            return F.linear(F.linear(dropout(x, self.p, training, gen), A), B) * self.scale
        W = dense_weight(base)
        norm = (W + (self.scale * (B @ A)).detach().to(W.dtype)).norm(dim=1).detach()
        mag_scale = (self.magnitude.to(x.dtype) / norm.to(x.dtype))
        if self.p > 0 and training:
            x = dropout(x, self.p, training, gen)
            plain = F.linear(x, W.to(x.dtype))
        else:
            plain = base_out if base.bias is None else base_out - base.bias
        return (mag_scale - 1) * plain + mag_scale * F.linear(F.linear(x, A), B) * self.scale

    @torch.no_grad()
    def merged_weight(self, W: torch.Tensor) -> torch.Tensor:
        merged = W.float() + self.delta_weight().float()
        if self.use_dora:
            merged = merged * (self.magnitude.float() / merged.norm(dim=1)).unsqueeze(1)
        return merged.to(W.dtype)


class VeraProjection(nn.Module):
    """VeRA's frozen random A and B, shared by all layers of one adapter, sized to the largest layer."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, device):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", _kaiming_uniform((r, max_in), g).to(device))
        self.register_buffer("B", _kaiming_uniform((max_out, r), g).to(device))


def _kaiming_uniform(shape, generator) -> torch.Tensor:
    # PEFT's VeRA init: uniform(±sqrt(3)·sqrt(2)/sqrt(fan_in)) drawn from a seeded generator.
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraWeights(nn.Module):
    batchable = False

    def __init__(self, cfg: AdapterConfig, base: nn.Linear, projection: VeraProjection):
        super().__init__()
        self.r, self.p = cfg.r, cfg.dropout
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lambda_d = nn.Parameter(torch.full((cfg.r,), cfg.vera_d_initial, device=base.weight.device))
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))
        self._projection = [projection]  # a list keeps it out of this module's state_dict

    @property
    def projection(self) -> VeraProjection:
        return self._projection[0]

    def _slices(self):
        return self.projection.A[:, : self.in_features], self.projection.B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        A, B = self._slices()
        return (self.lambda_b.unsqueeze(1) * B) @ (self.lambda_d.unsqueeze(1) * A)

    def delta(self, x, base_out, base: nn.Linear, training: bool, gen) -> torch.Tensor:
        A, B = (t.to(x.dtype) for t in self._slices())
        h = self.lambda_d.to(x.dtype) * F.linear(dropout(x, self.p, training, gen), A)
        return self.lambda_b.to(x.dtype) * F.linear(h, B)

    @torch.no_grad()
    def merged_weight(self, W: torch.Tensor) -> torch.Tensor:
        return (W.float() + self.delta_weight().float()).to(W.dtype)


class SubspaceWeights(nn.Module):
    """Every adapter of one compressed store on one layer (`rayft.adapters.compress`): the layer's
    basis and mean for A and for B, and each adapter's loadings and scale, all on the device. An
    adapter's A and B are rebuilt for the rows that use it in each forward (a (K, k) by (k, r·in)
    product for K adapters: small beside the rows' own matmuls), so any number of a store's adapters
    serve in one batch while the device holds one basis, not one A and B per adapter. Inference only.
    """

    batchable = True

    def __init__(self, r: int, in_features: int, out_features: int, basis: dict[str, torch.Tensor],
                 loadings: dict[str, torch.Tensor], scales: torch.Tensor, device):
        super().__init__()
        self.r, self.p, self.in_features, self.out_features = r, 0.0, in_features, out_features
        for side in ("A", "B"):  # basis[side]: (k, D); basis[side + "_mean"]: (D,); loadings[side]: (N, k)
            self.register_buffer(f"basis_{side}", basis[side].float().to(device))
            self.register_buffer(f"mean_{side}", basis[f"{side}_mean"].float().to(device))
            self.register_buffer(f"loadings_{side}", loadings[side].float().to(device))
        self.register_buffer("scales", scales.float().to(device))

    @property
    def group(self) -> tuple:
        return ("subspace", id(self))  # only a store's own adapters share its computation

    @property
    def members(self) -> int:
        return self.scales.shape[0]

    def stacked(self, index: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A (K, r, in) and the scaled B (K, out, r) of the adapters at `index`."""
        A = torch.addmm(self.mean_A, self.loadings_A[index], self.basis_A)
        B = torch.addmm(self.mean_B, self.loadings_B[index], self.basis_B) * self.scales[index, None]
        k = index.shape[0]
        return A.view(k, self.r, self.in_features).to(dtype), B.view(k, self.out_features, self.r).to(dtype)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise ValueError("a compressed store's adapters serve only; decompress one to train it")
        return self
