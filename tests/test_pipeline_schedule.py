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
