"""How a base model's decoder layers split into pipeline stages. Pure Python.

A staged replica holds contiguous slices of the decoder layers, one per stage actor; the first
stage also holds the input embeddings, the last the final norm and the output head. The split is
computed, never hand-written: given each layer's cost (its parameters, or its measured time) and
the extra cost of the ends, `balanced_stages` returns the contiguous split whose most loaded stage
is as light as possible (the pipeline runs at the pace of its slowest stage), exactly, by dynamic
programming over the split points.
"""

from __future__ import annotations

import re
from functools import cache

from rayft.scheduler.memory import ModelShape

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def balanced_stages(costs: list[float], stages: int, first: float = 0.0, last: float = 0.0) -> list[range]:
    """Split layers of the given costs into `stages` contiguous, non-empty ranges minimising the
    largest stage cost, where the first stage also carries `first` and the last `last` (embeddings,
    head). Of splits with the same heaviest stage, the more even one is preferred (a lower sum of
    squared loads among the choices each sub-split leaves; deterministic)."""
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"{stages} stages for {n} decoder layers: every stage needs at least one layer")
    if any(c < 0 for c in costs) or first < 0 or last < 0:
        raise ValueError("costs must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(start: int, stop: int, k: int) -> float:  # stage k holding layers [start, stop)
        return prefix[stop] - prefix[start] + (first if k == 0 else 0.0) + (last if k == stages - 1 else 0.0)

    @cache
    def best(start: int, k: int) -> tuple[float, float, tuple[int, ...]]:
        """For layers [start, n) over stages k..: the lightest heaviest stage, the sum of squared
        loads, and the cut points."""
        if k == stages - 1:
            w = load(start, n, k)
            return w, w * w, ()
        options = []
        for stop in range(start + 1, n - (stages - k - 1) + 1):  # leave a layer for every later stage
            heaviest, squares, cuts = best(stop, k + 1)
            w = load(start, stop, k)
            options.append((max(w, heaviest), w * w + squares, (stop, *cuts)))
        return min(options, key=lambda o: (o[0], o[1]))

    _, _, cuts = best(0, 0)
    bounds = [0, *cuts, n]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_loads(costs: list[float], split: list[range], first: float = 0.0, last: float = 0.0) -> list[float]:
    """Each stage's cost under `split` (the ends' extras included)."""
    loads = [sum(costs[i] for i in r) for r in split]
    loads[0] += first
    loads[-1] += last
    return loads


def parameter_costs(model: ModelShape) -> tuple[list[float], float, float]:
    """(per decoder layer, first stage's extra, last stage's extra) in parameters: each layer's
    linears (their index is the first number in their module path); the input embeddings on the
    first stage, the output head on the last (a tied head is still a copy there)."""
    costs = [0.0] * model.layers
    for name, n_in, n_out in model.linears:
        found = _LAYER_INDEX.search(name)
        if found is None or int(found.group(1)) >= model.layers:
            raise ValueError(f"linear {name!r} is not inside one of the model's {model.layers} decoder layers")
        costs[int(found.group(1))] += n_in * n_out
    ends = float(model.vocab * model.hidden)
    return costs, ends, ends

