"""The 1F1B order of a staged replica's micro-batches, and its bubble. Pure Python.

A staged replica pushes M micro-batches (each job's own rows, several jobs' at once, over several
optimizer steps: `pipeline_slots` orders them) through its S stages: stage s first runs S - 1 - s
forwards (the warm-up), then alternates one forward and one backward, then drains the remaining
backwards. A forward of micro-batch m on stage s needs its forward on stage s - 1; its backward
needs its backward on stage s + 1 and its own forward. `simulate` replays the per-stage orders
with given op times and reports the makespan and the bubble (the share of stage time spent
waiting), to check a schedule against mLoRA's and GPipe's formulas before any process runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

Op = tuple[str, int]  # ("F" | "B", micro-batch index)


def one_f_one_b(stages: int, micro_batches: int) -> list[list[Op]]:
    """Each stage's op order under 1F1B for micro-batches 0..M-1 (in flight on stage s: at most S - s)."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages ({stages}) and micro_batches ({micro_batches}) must be >= 1")
    orders = []
    for s in range(stages):
        warm = min(stages - 1 - s, micro_batches)
        ops: list[Op] = [("F", m) for m in range(warm)]
        f, b = warm, 0
        while f < micro_batches:  # steady state: one forward, then the oldest backward
            ops.append(("F", f))
            f += 1
            ops.append(("B", b))
            b += 1
        ops += [("B", m) for m in range(b, micro_batches)]
        orders.append(ops)
    return orders


def pipeline_slots(windows: list[int], steps: int, stages: int) -> list[tuple[int, int] | None]:
    """The micro-batch order of `steps` optimizer steps of jobs whose accumulation windows are
    `windows` micro-batches long: step by step, job by job, each window contiguous, as (job, step);
    None for an idle slot. A job's next window starts at least `stages` slots after its last one
    ended: under 1F1B every stage has then run that window's backward (and the job's update) before
    the job's next forward. With fewer jobs than stages the gap is idle: mLoRA's (S - K) / S bubble.
    Without the gap a stage would wait for a job's gradient norm that waits on its own backward."""
    slots: list[tuple[int, int] | None] = []
    ended: dict[int, int] = {}
    for t in range(steps):
        for k, window in enumerate(windows):
            if k in ended:
                slots += [None] * max(0, ended[k] + stages - len(slots))
            slots += [(k, t)] * window
            ended[k] = len(slots) - 1
    return slots


def slot_orders(slots: list, stages: int) -> list[list[Op]]:
    """Each stage's 1F1B order over the slots, idle ones left out (they run nothing, send nothing)."""
    return [[op for op in order if slots[op[1]] is not None] for order in one_f_one_b(stages, len(slots))]


@dataclass(frozen=True)
class Timeline:
    makespan: float
    busy: float  # summed op time over all stages

    def bubble(self, stages: int) -> float:
        return 1.0 - self.busy / (stages * self.makespan)


def simulate(orders: list[list[Op]], forward: float = 1.0, backward: float = 2.0) -> Timeline:
    """Run the per-stage orders with their dependencies; each stage does one op at a time, in order."""
    stages = len(orders)
    done: dict[tuple[str, int, int], float] = {}  # (op, micro-batch, stage) -> finish time
    clock = [0.0] * stages
    nxt = [0] * stages
    busy = 0.0
    while any(nxt[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if nxt[s] == len(orders[s]):
                continue
            kind, m = orders[s][nxt[s]]
            needs = [("F", m, s - 1)] if kind == "F" and s > 0 else []
            if kind == "B":
                needs = [("F", m, s)] + ([("B", m, s + 1)] if s < stages - 1 else [])
            if all(n in done for n in needs):
                start = max([clock[s]] + [done[n] for n in needs])
                took = forward if kind == "F" else backward
                done[(kind, m, s)] = clock[s] = start + took
                busy += took
                nxt[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("the stage orders deadlock: an op waits for one that is scheduled after it")
    return Timeline(max(clock), busy)


def mlora_bubble(stages: int, jobs: int) -> float:
    """mLoRA's bubble for independent adapters keeping a pipeline busy: max((S - K) / S, 0)."""
    return max((stages - jobs) / stages, 0.0)


def gpipe_bubble(stages: int, micro_batches: int) -> float:
    """The bubble of one flushed step of M micro-batches on S stages: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
