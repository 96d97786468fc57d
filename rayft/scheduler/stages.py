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

from rayft.scheduler.memory import (
    DEFAULT_COEFFICIENTS,
    Coefficients,
    Estimate,
    JobShape,
    ModelShape,
    adapter_bytes,
    estimate,
)

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



def stage_split(model: ModelShape, stages: int) -> list[range]:
    """The decoder layers of each stage, balanced by parameters (what a staged replica holds)."""
    costs, first, last = parameter_costs(model)
    return balanced_stages(costs, stages, first, last)


def stage_estimates(model: ModelShape, jobs: dict[str, JobShape], stages: int,
                    coef: Coefficients = DEFAULT_COEFFICIENTS) -> list[Estimate]:
    """The peak of each stage of an S-stage replica running these jobs (S = 1: `estimate` itself).

    A stage holds its layers' weights (the first the input embeddings, the last the head), each
    job's adapter on its layers, and the activations of the micro-batches 1F1B keeps in flight
    there: up to S - s on stage s (each a single job's micro-batch; counted here as the largest
    ones), the logits only on the last stage, one micro-batch at a time."""
    if stages == 1:
        return [estimate(model, jobs, coef)]
    split = stage_split(model, stages)
    costs, ends, _ = parameter_costs(model)
    # what the linears and the two ends leave of the parameters (norms, biases, fused experts), per
    # layer; a tied head is a copy of its own on the last stage, so both ends are counted in full
    other = max(0.0, model.params - sum(costs) - 2 * ends) / model.layers
    by_layer: dict[int, list] = {}
    for shape in model.linears:
        by_layer.setdefault(int(_LAYER_INDEX.search(shape[0]).group(1)), []).append(shape)
    units = sorted((job.activation_bytes(model, coef, 1) for job in jobs.values()
                    for _ in range(job.micro_batches)), reverse=True)  # per micro-batch, per layer
    out = []
    for s, layers in enumerate(split):
        params = sum(costs[i] + other for i in layers) + (ends if s == 0 else 0) + (ends if s == stages - 1 else 0)
        est = Estimate(base=int(params * model.dtype_bytes), workspace=int(coef.workspace))
        here = tuple(shape for i in layers for shape in by_layer.get(i, ()))
        for name, job in jobs.items():
            est.adapters[name] = adapter_bytes(job, model, here)
        est.activations = sum(units[: stages - s]) * len(layers)
        if s == stages - 1 and jobs:
            est.logits = max(job.logit_bytes(model, coef) for job in jobs.values())
        out.append(est)
    return out


def fewest_stages(model: ModelShape, jobs: dict[str, JobShape], budget_bytes: int,
                  coef: Coefficients = DEFAULT_COEFFICIENTS, most: int | None = None) -> int | None:
    """The fewest stages (up to `most`, at most one layer each) whose every stage's estimate stays
    under `budget_bytes`; None when no count does."""
    for stages in range(1, min(model.layers, most or model.layers) + 1):
        if max(e.total for e in stage_estimates(model, jobs, stages, coef)) <= budget_bytes:
            return stages
    return None
