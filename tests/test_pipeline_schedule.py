"""The 1F1B order: every stage runs every micro-batch's forward and backward once, holds at most
S - s in flight, never deadlocks, and a flushed step's bubble is GPipe's (S - 1) / (M + S - 1)."""

import pytest

from rayft.scheduler.pipeline import gpipe_bubble, one_f_one_b, simulate


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("micro", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("times", [(1.0, 2.0), (1.0, 1.0), (2.0, 3.0)])
def test_one_f_one_b_is_complete_bounded_and_has_gpipes_bubble(stages, micro, times):
    orders = one_f_one_b(stages, micro)
    for s, ops in enumerate(orders):
        assert sorted(ops) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        in_flight = 0
        for kind, _ in ops:
            in_flight += 1 if kind == "F" else -1
            assert 0 <= in_flight <= stages - s  # activations kept: at most S - s micro-batches
        assert [m for k, m in ops if k == "F"] == list(range(micro))  # in order on every stage
    t = simulate(orders, *times)
    assert t.busy == pytest.approx(stages * micro * sum(times))
    assert t.bubble(stages) == pytest.approx(gpipe_bubble(stages, micro))


def test_an_order_that_waits_on_itself_is_refused():
    orders = one_f_one_b(2, 2)
    orders[1] = [("B", 0), ("F", 0), ("F", 1), ("B", 1)]  # a backward before its own forward
    with pytest.raises(ValueError, match="deadlock"):
        simulate(orders)
    with pytest.raises(ValueError, match="must be >= 1"):
        one_f_one_b(0, 4)


def test_pipeline_slots_keep_each_jobs_windows_apart_and_fill_the_bubble_with_jobs():
    import random

    from rayft.scheduler.pipeline import pipeline_slots, slot_orders

    rng = random.Random(0)
    for _ in range(60):
        stages, jobs, steps = rng.randint(1, 6), rng.randint(1, 9), rng.randint(1, 6)
        windows = [rng.randint(1, 3) for _ in range(jobs)]
        slots = pipeline_slots(windows, steps, stages)
        real = [s for s in slots if s is not None]
        assert sorted(real) == sorted((k, t) for k in range(jobs) for t in range(steps) for _ in range(windows[k]))
        for k in range(jobs):  # each window contiguous, the next one at least S slots after it
            where = [i for i, s in enumerate(slots) if s is not None and s[0] == k]
            for t in range(1, steps):
                this = [i for i in where if slots[i][1] == t]
                before = [i for i in where if slots[i][1] == t - 1]
                assert this == list(range(this[0], this[0] + windows[k]))
                assert this[0] - before[-1] >= stages
        orders = slot_orders(slots, stages)
        for s, order in enumerate(orders):  # under 1F1B the update lands before the job's next forward
            seen_backward: set = set()
            for op, m in order:
                if op == "B":
                    seen_backward.add(m)
                    continue
                k, t = slots[m]
                if t:
                    last_before = max(i for i, x in enumerate(slots) if x == (k, t - 1))
                    assert last_before in seen_backward, (s, m)
        simulate(orders)  # and it does not deadlock
    # with at least as many jobs as stages and many steps, no idle slot at all; with fewer, (S - K) / S
    assert None not in pipeline_slots([1] * 4, 50, 4)
    slots = pipeline_slots([1], 50, 4)
    assert slots.count(None) / len(slots) == pytest.approx(3 / 4, abs=0.02)


@pytest.mark.parametrize("stages", [2, 4])
def test_the_simulated_bubble_falls_to_mloras_with_more_jobs(stages):
    from rayft.scheduler.pipeline import mlora_bubble, pipeline_slots, slot_orders

    bubbles = []
    for jobs in (1, 2, 4, 8):
        slots = pipeline_slots([1] * jobs, 64, stages)
        bubbles.append(simulate(slot_orders(slots, stages), 1.0, 2.0).bubble(stages))
        # the drain at the end of the call is the only bubble beyond mLoRA's formula
        assert bubbles[-1] == pytest.approx(mlora_bubble(stages, jobs), abs=0.06)
    assert bubbles == sorted(bubbles, reverse=True)
