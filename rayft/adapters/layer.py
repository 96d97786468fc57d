"""One frozen base linear and many adapters, each applied to its own rows (or tokens) of the batch.

The base GEMM runs once over every row. Inputs flattened to (rows·tokens, d) are viewed as
(rows, tokens, d) first (`Router.rows_view`; per token, as (tokens, 1, d)), so a segment always
meets its own tokens. Each routed segment then adds its adapter's delta. Runs of adjacent
segments whose adapters are plain LoRA of one rank share one grouped computation, two `bmm` over
their slots of the layer's `LoraStack` (no per-forward stacking), instead of K pairs of small
matmuls: on a GPU those small launches, not FLOPs, set the step time. Segments of equal size are
a (K, rows·T, d) view; in training, segments of different sizes are gathered into (K, longest, d),
right-padded (each keeps its own dropout mask, drawn on its own tokens); in inference each row
gathers its adapter's weights instead.
"""

from __future__ import annotations

import torch
from torch import nn

from rayft.adapters.dense import is_quantized
from rayft.adapters.routing import Router, Segment
from rayft.adapters.slots import LoraStack
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
        self.stacks: dict[int, LoraStack] = {}  # the LoRA adapters' weights, by rank

    def lora_stack(self, r: int) -> LoraStack:
        """The stacked storage of this layer's rank-r LoRA adapters (made on first use)."""
        if r not in self.stacks:
            self.stacks[r] = LoraStack(r, self.in_features, self.out_features, self.base.weight.device)
        return self.stacks[r]

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
        return self._add_adapters(x, self.base(x))

    # Routing is Python over the step's segments, which change from step to step: torch.compile
    # (base_model.compile) traces the base around it, not through it, so a new job set or token
    # count never recompiles.
    @torch.compiler.disable
    def _add_adapters(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
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
            xr, segments = x, [Segment(segments[0].adapter, 0, x.shape[0], segments[0].member)]
        outr = out if xr is x else out.view(*xr.shape[:-1], out.shape[-1])
        runs = _batchable_runs(segments, self.adapters)
        # each run's rows, cut with one split (its backward is one concatenation; a slice per run
        # would zero-fill the whole input's gradient once per run)
        xs, outs = _blocks(xr, runs), _blocks(outr, runs)
        pieces: list[tuple[int, int, torch.Tensor]] = []
        for run in runs:
            pieces.extend(self._run_delta(run, xs[run[0].start], outs[run[0].start], router))
        delta = _assemble(pieces, outr)
        return out + (delta if xr is x else delta.view(out.shape))

    def _run_delta(self, run: list[Segment], x, out, router: Router):
        """The deltas of one run of segments; `x` and `out` are the run's rows only."""
        training = self.training
        if len(run) == 1 and run[0].member is None:  # one adapter: its own two matmuls
            s = run[0]
            w = self.adapters[s.adapter]
            gen = router.dropout_generator(s.adapter, self.name) if training and w.p > 0 else None
            return [(s.start, s.stop, w.delta(x, out, self.base, training, gen))]
        weights = [self.adapters[s.adapter] for s in run]
        start, stop = run[0].start, run[-1].stop
        A, B = self._stacked(run, weights, router, x)  # (K, r, in), (K, out, r), B scaled
        sizes = [s.rows for s in run]
        if len(set(sizes)) > 1 and not training:
            return [(start, stop, self._gathered_delta(router.row_owners(tuple(sizes), x.device), A, B, x))]
        if any(w.p > 0 for w in weights) and training:
            xs = torch.cat([
                dropout(xk, w.p, training, router.dropout_generator(s.adapter, self.name))
                for xk, s, w in zip(x.split(sizes), run, weights)
            ])
        else:
            xs = x
        flat = xs.reshape(-1, x.shape[-1])  # the run's tokens
        per_row = flat.shape[0] // (stop - start)
        if len(set(sizes)) == 1:
            delta = torch.bmm(torch.bmm(flat.view(len(run), -1, flat.shape[-1]), A.transpose(1, 2)), B.transpose(1, 2))
            return [(start, stop, delta.reshape(*xs.shape[:-1], self.out_features))]
        pad, take = router.padded_index(tuple(n * per_row for n in sizes), x.device)
        padded = flat.index_select(0, pad).view(len(run), -1, flat.shape[-1])  # (K, longest, in)
        delta = torch.bmm(torch.bmm(padded, A.transpose(1, 2)), B.transpose(1, 2)).reshape(-1, self.out_features)
        return [(start, stop, delta.index_select(0, take).view(*xs.shape[:-1], self.out_features))]

    def _stacked(self, run: list[Segment], weights: list, router: Router, x: torch.Tensor):
        """A (K, r, in) and scaled B (K, out, r) of a run's adapters: slots of the layer's stack, or
        a compressed store's adapters rebuilt from its basis."""
        if run[0].member is not None:
            return weights[0].stacked(router.member_index(tuple(s.member for s in run), x.device), x.dtype)
        A, B = weights[0].stack.weights([w.slot for w in weights])
        return A.to(x.dtype), B.to(x.dtype) * self._scales(tuple(w.scale for w in weights), x.dtype, x.device)

    def _gathered_delta(self, idx: torch.Tensor, A, B, x: torch.Tensor) -> torch.Tensor:
        """LoRA deltas for rows of several adapters with different row counts: row i takes adapter
        idx[i]'s (scaled) A and B from the stacked ones, then two bmm over rows. Inference only."""
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, T, in)
        delta = torch.bmm(torch.bmm(xs, A[idx].transpose(1, 2)), B[idx].transpose(1, 2))
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
        if is_quantized(self.base):
            raise RuntimeError(f"{self.name}: a 4- or 8-bit base layer cannot take an adapter folded into its "
                               "weights; apply the adapter on top instead")
        self._original = self.base.weight.data.clone()
        self.base.weight.data = self.adapters[name].merged_weight(self.base.weight.data)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is not None:
            self.base.weight.data = self._original
            del self._original
            self.merged = None


def _batchable_runs(segments: list[Segment], adapters: AdapterDict) -> list[list[Segment]]:
    """Split segments (in row order) into runs that one grouped computation can serve: adjacent
    plain LoRA adapters of one rank (or adapters of one compressed store), of sizes within a factor
    of two of each other (right-padding a run to its longest segment then at most doubles its LoRA
    arithmetic)."""
    runs: list[list[Segment]] = []
    for s in segments:
        w = adapters[s.adapter]
        if runs:
            run = runs[-1]
            prev = run[-1]
            pw = adapters[prev.adapter]
            sizes = [x.rows for x in run] + [s.rows]
            if (
                w.batchable
                and pw.batchable
                and prev.stop == s.start
                and pw.group == w.group
                and max(sizes) <= 2 * min(sizes)
            ):
                run.append(s)
                continue
        runs.append([s])
    return runs


def _blocks(t: torch.Tensor, runs: list[list[Segment]]) -> dict[int, torch.Tensor]:
    """`t`'s rows of each run, keyed by the run's first row."""
    if len(runs) == 1 and runs[0][0].start == 0 and runs[0][-1].stop == t.shape[0]:
        return {0: t}
    bounds = sorted({0, t.shape[0]} | {r[0].start for r in runs} | {r[-1].stop for r in runs})
    return dict(zip(bounds, t.split([b - a for a, b in zip(bounds, bounds[1:])])))


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
