"""One frozen base linear and many adapters, each applied to its own rows of the batch.

The base GEMM runs once over every row. Inputs flattened to (rows·tokens, d) are viewed as
(rows, tokens, d) first (`Router.rows_view`), so a row segment always meets its own tokens.
Each routed segment then adds its adapter's delta. Runs of adjacent segments whose adapters are
plain LoRA of one rank and own equally many rows are computed as two `bmm` over a (K, rows·T, d)
view instead of K pairs of small matmuls: on a GPU those small launches, not FLOPs, set the step
time (DESIGN.md, measured anchors). In inference (no dropout), segments of different row counts
share two `bmm` too, each row gathering its adapter's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from rayft.adapters.routing import Router, Segment
from rayft.adapters.variants import dropout


class AdapterDict(nn.Module):
    """Adapters by name. Unlike nn.ModuleDict, any name works (even 'train' or 'forward')."""

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self._modules[name] = module

    def __delitem__(self, name: str) -> None:
        del self._modules[name]

    def __contains__(self, name) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Linear, router: Router, name: str = ""):
        super().__init__()
        self.base = base
        self.name = name  # its path in the model, for errors
        self.fan_in_fan_out = False  # the wrapped layer was a Conv1D, weight stored (in, out)
        self.adapters = AdapterDict()
        self._router = [router]  # shared by every layer; a list keeps it off the module tree
        self.merged: str | None = None  # name of an adapter folded into base.weight, if any
        self._scale_cache: dict[tuple, torch.Tensor] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its projections
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        router = self._router[0]
        segments = [s for s in router.segments if s.adapter in self.adapters]
        if not segments:
            return out
        if self.merged is not None:  # the merged weights already serve every row
            raise RuntimeError(f"adapter {self.merged!r} is merged into this layer: unmerge before routing adapters")
        # rows first, whatever shape the model gave this layer (a view, no copy); None: one
        # adapter over everything this layer sees
        xr = router.rows_view(x, router.segments, self.name)
        if xr is None:
            xr, segments = x, [Segment(segments[0].adapter, 0, x.shape[0])]
        outr = out if xr is x else out.view(*xr.shape[:-1], out.shape[-1])
        pieces: list[tuple[int, int, torch.Tensor]] = []
        # without dropout (inference), adapters with different row counts can share the bmm too,
        # each row gathering its own adapter's weights (serving: many adapters, few rows each)
        for run in _batchable_runs(segments, self.adapters, equal_rows=self.training):
            pieces.extend(self._run_delta(run, xr, outr, router))
        delta = _assemble(pieces, outr)
        return out + (delta if xr is x else delta.view(out.shape))

    def _run_delta(self, run: list[Segment], x, out, router: Router):
        training = self.training
        if len(run) == 1:
            s = run[0]
            w = self.adapters[s.adapter]
            gen = router.generators.get(s.adapter)
            return [(s.start, s.stop, w.delta(x[s.start : s.stop], out[s.start : s.stop], self.base, training, gen))]
        weights = [self.adapters[s.adapter] for s in run]
        k, rows = len(run), run[0].rows
        start, stop = run[0].start, run[-1].stop
        if any(s.rows != rows for s in run):
            return [(start, stop, self._gathered_delta(run, weights, x[start:stop]))]
        if any(w.p > 0 for w in weights) and training:
            xs = torch.stack([
                dropout(x[s.start : s.stop], w.p, training, router.generators.get(s.adapter))
                for s, w in zip(run, weights)
            ])
        else:
            xs = x[start:stop]
        xs = xs.reshape(k, -1, x.shape[-1])
        A = torch.stack([w.lora_A for w in weights]).to(x.dtype)  # (K, r, in)
        B = torch.stack([w.lora_B for w in weights]).to(x.dtype)  # (K, out, r)
        scale = self._scales(tuple(w.scale for w in weights), x.dtype, x.device)
        delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), (B * scale).transpose(1, 2))
        return [(start, stop, delta.reshape(k * rows, *x.shape[1:-1], self.out_features))]

    def _gathered_delta(self, run: list[Segment], weights, x: torch.Tensor) -> torch.Tensor:
        """LoRA deltas for rows of several adapters with different row counts: each row takes its
        adapter's A and B (a gather), then two bmm over rows. No dropout: inference only."""
        idx = torch.repeat_interleave(
            torch.arange(len(run), device=x.device),
            torch.tensor([s.rows for s in run], device=x.device))
        scale = self._scales(tuple(w.scale for w in weights), x.dtype, x.device)
        A = torch.stack([w.lora_A for w in weights]).to(x.dtype)[idx]  # (rows, r, in)
        B = (torch.stack([w.lora_B for w in weights]).to(x.dtype) * scale)[idx]  # (rows, out, r)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, T, in)
        delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _scales(self, scales: tuple[float, ...], dtype, device) -> torch.Tensor:
        """(K, 1, 1) scales on the device, made once: building them each forward would be a
        host-to-device copy, which waits for the stream, in every layer of every step."""
        key = (scales, dtype, device)
        if key not in self._scale_cache:
            self._scale_cache[key] = torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)
        return self._scale_cache[key]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged into {self}")
        self._original = self.base.weight.data.clone()
        self.base.weight.data = self.adapters[name].merged_weight(self.base.weight.data)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is not None:
            self.base.weight.data = self._original
            del self._original
            self.merged = None


def _batchable_runs(segments: list[Segment], adapters: AdapterDict, equal_rows: bool = True) -> list[list[Segment]]:
    """Split segments (in row order) into runs that one bmm can serve (with `equal_rows`, only
    segments of as many rows as each other: the (K, rows·T, d) view)."""
    runs: list[list[Segment]] = []
    for s in segments:
        w = adapters[s.adapter]
        if runs:
            prev = runs[-1][-1]
            pw = adapters[prev.adapter]
            if (
                w.batchable
                and pw.batchable
                and prev.stop == s.start
                and (prev.rows == s.rows or not equal_rows)
                and pw.r == w.r
            ):
                runs[-1].append(s)
                continue
        runs.append([s])
    return runs


def _assemble(pieces: list[tuple[int, int, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """Concatenate row-range deltas into one tensor shaped like `out`, zeros where no adapter applies."""
    parts, row = [], 0
    for start, stop, delta in pieces:
        if start > row:
            parts.append(out.new_zeros((start - row, *out.shape[1:])))
        parts.append(delta.to(out.dtype))
        row = stop
    if row < out.shape[0]:
        parts.append(out.new_zeros((out.shape[0] - row, *out.shape[1:])))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
