"""Which adapter applies to which rows of the batch.

Every multi-adapter layer of a model shares one `Router`. Before a forward the engine sets its
segments: contiguous row ranges of the batch, each owned by one adapter (or by none: base only).
Rows are the batch dimension, so the same routing serves a packed training batch [R, L, d] and a
decode step [B, 1, d].
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    adapter: str | None
    start: int  # first row
    stop: int  # one past the last row

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Router:
    segments: tuple[Segment, ...] = ()
    # One RNG per adapter for its dropout masks, so a job's masks do not depend on its neighbours.
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    @contextmanager
    def route(self, segments):
        segments = tuple(s for s in segments if s.adapter is not None and s.rows > 0)
        for a, b in zip(segments, segments[1:]):
            if b.start < a.stop:
                raise ValueError(f"segments overlap or are out of order: {a} then {b}")
        previous, self.segments = self.segments, segments
        try:
            yield
        finally:
            self.segments = previous

    @contextmanager
    def use(self, adapter: str | None, rows: int):
        """Apply one adapter (or none) to the first `rows` rows: generation with a single adapter."""
        with self.route([Segment(adapter, 0, rows)]):
            yield
