"""Which adapter applies to which tokens of the batch.

Every multi-adapter layer of a model shares one `Router`. Before a forward the engine sets its
segments: contiguous ranges of the batch, each owned by one adapter (or by none: base only), in
rows (serving and evaluation: a row stands for its tokens) or, `per_token`, in tokens of the
flattened batch (training's one packed stream, where each job owns a range of tokens). The model's
token ids (R, T) fix the layout, recorded by a hook on the input embedding at the start of every
forward, so a layer can find a segment's tokens whether it sees them as (R, T, d) or flattened to
(R·T, d) (OPT's fc1/fc2, an MoE block's shared expert). A layer whose input maps to neither
refuses (`RoutingError`) rather than guess.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rayft.adapters.rng import AdapterRNG


class RoutingError(RuntimeError):
    """A layer whose input cannot be mapped to the batch's tokens while several segments are routed."""


@dataclass(frozen=True)
class Segment:
    adapter: str | None
    start: int  # first row (first token, when routed per token)
    stop: int  # one past the last
    member: int | None = None  # which adapter of a compressed store `adapter` names (None: a plain adapter)

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Router:
    segments: tuple[Segment, ...] = ()
    # Each adapter's dropout streams (one per layer), so a job's masks depend on nothing else.
    generators: dict[str, AdapterRNG] = field(default_factory=dict)
    # (rows, tokens per row) of the forward now running, from its token ids; None when unknown
    layout: tuple[int, int] | None = None
    per_token: bool = False  # segments count tokens of the flattened batch, not rows
    # index tensors every layer of one forward shares (made once per routing, on the device)
    _indices: dict = field(default_factory=dict, repr=False)

    def record_layout(self, module, args, kwargs) -> None:
        """Forward pre-hook of the input embedding: its token ids are the batch's (rows, tokens)."""
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        self.layout = tuple(ids.shape) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def forget_layout(self, module, args, kwargs) -> None:
        """Forward pre-hook of the model: a forward fed embeddings, not ids, has no recorded layout."""
        self.layout = None

    def rows_view(self, x: torch.Tensor, segments: tuple[Segment, ...], layer: str) -> torch.Tensor | None:
        """`x` viewed with the batch's rows first (per token: as (tokens, 1, d), a row per token), so
        segments index their own tokens; None when one segment covers everything (its adapter then
        applies to whatever the layer sees, as in PEFT). Raises `RoutingError` naming `layer` when
        its input cannot be mapped to the batch's tokens."""
        if self.per_token:
            return self._tokens_view(x, segments, layer)
        if self.layout is None:
            # No token ids (fed embeddings, or not a language model): batch-first (R, T, d) inputs
            # still say which row a token is in; a 2-D input could be rows or flattened tokens.
            if x.dim() >= 3:
                return x
            rows = None
        else:
            rows, tokens = self.layout
            if x.dim() >= 3 and x.shape[0] == rows and x.numel() == rows * tokens * x.shape[-1]:
                return x
            if x.dim() == 2 and x.shape[0] == rows * tokens:
                return x.view(rows, tokens, x.shape[-1])
        if len(segments) == 1 and segments[0].start == 0 and rows is not None and segments[0].stop >= rows:
            return None
        raise RoutingError(
            f"layer {layer}: its input of shape {tuple(x.shape)} does not map to the batch's tokens "
            f"({'unknown layout' if rows is None else f'{rows} rows x {tokens} tokens'}), so adapters of "
            f"different rows cannot be routed in it; leave it out of target_modules or route one adapter "
            f"over the whole batch"
        )

    def _tokens_view(self, x: torch.Tensor, segments: tuple[Segment, ...], layer: str) -> torch.Tensor | None:
        if self.layout is None:
            raise RoutingError(f"layer {layer}: adapters are routed per token, but this forward was not fed token ids")
        rows, tokens = self.layout
        n = rows * tokens
        if x.numel() != n * x.shape[-1] or not (x.shape[0] == n or (x.dim() >= 3 and x.shape[0] == rows)):
            raise RoutingError(
                f"layer {layer}: its input of shape {tuple(x.shape)} does not map to the batch's {n} tokens, "
                f"so adapters of different jobs cannot be routed in it; leave it out of target_modules")
        if len(segments) == 1 and segments[0].start == 0 and segments[0].stop >= n:
            return None
        return x.reshape(n, 1, x.shape[-1])

    @contextmanager
    def route(self, segments, per_token: bool = False):
        segments = tuple(s for s in segments if s.adapter is not None and s.rows > 0)
        for a, b in zip(segments, segments[1:]):
            if b.start < a.stop:
                raise ValueError(f"segments overlap or are out of order: {a} then {b}")
        previous, self.segments = (self.segments, self.per_token, self._indices), segments
        self.per_token, self._indices = per_token, {}
        try:
            yield
        finally:
            self.segments, self.per_token, self._indices = previous

    def row_owners(self, sizes: tuple[int, ...], device) -> torch.Tensor:
        """For K consecutive groups of `sizes` rows: each row's group index. Made once per routing and device."""
        key = ("owners", sizes, device)
        if key not in self._indices:
            self._indices[key] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
        return self._indices[key]

    def padded_index(self, sizes: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
        """For K consecutive groups of `sizes` tokens: (pad, take). `pad` (K * longest,) lays them out
        right-padded as (K, longest) (a padded slot repeats its group's last token), and `take`
        (sum of sizes,) picks the real slots back, in order. Made once per routing and device."""
        key = (sizes, device)
        if key not in self._indices:
            width, pad, take, offset = max(sizes), [], [], 0
            for k, n in enumerate(sizes):
                pad += [offset + min(t, n - 1) for t in range(width)]
                take += range(k * width, k * width + n)
                offset += n
            self._indices[key] = (torch.tensor(pad, device=device), torch.tensor(take, device=device))
        return self._indices[key]

    def member_index(self, members: tuple[int, ...], device) -> torch.Tensor:
        """The store members of K consecutive segments, as an index on the device. Made once per routing."""
        key = ("members", members, device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(members, device=device)
        return self._indices[key]

    def dropout_generator(self, adapter: str, layer: str) -> torch.Generator | None:
        rng = self.generators.get(adapter)
        return None if rng is None else rng.dropout_generator(layer)

    @contextmanager
    def use(self, adapter: str | None, rows: int):
        """Apply one adapter (or none) to the first `rows` rows: generation with a single adapter."""
        with self.route([Segment(adapter, 0, rows)]):
            yield
