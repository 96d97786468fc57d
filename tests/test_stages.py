"""The pipeline-stage split: contiguous, every stage non-empty, and its heaviest stage as light as
any split's (checked against every split of small generated cases)."""

import itertools
import random

import pytest

from rayft.scheduler.memory import TINYLLAMA_CONFIG, ModelShape
from rayft.scheduler.stages import balanced_stages, parameter_costs, stage_loads


def all_splits(n: int, stages: int):
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        yield [range(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(60))
def test_the_split_is_contiguous_and_as_balanced_as_any(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    stages = rng.randint(1, n)
    costs = [rng.choice([1, 2, 3, 5, 8, 13]) for _ in range(n)]  # integers: sums compare exactly
    first, last = rng.choice([0, 4, 20]), rng.choice([0, 4, 20])
    split = balanced_stages(costs, stages, first, last)
    assert len(split) == stages and all(len(r) > 0 for r in split)
    assert [i for r in split for i in r] == list(range(n))  # contiguous, in order, every layer once
    best = min(max(stage_loads(costs, s, first, last)) for s in all_splits(n, stages))
    assert max(stage_loads(costs, split, first, last)) == best
    assert balanced_stages(costs, stages, first, last) == split  # deterministic


def test_equal_layers_split_evenly_and_the_ends_push_layers_inward():
    assert [len(r) for r in balanced_stages([1.0] * 12, 3)] == [4, 4, 4]
    assert [len(r) for r in balanced_stages([1.0] * 10, 3)] in ([3, 3, 4], [3, 4, 3], [4, 3, 3])
    # a large embedding on the first stage and a large head on the last: fewer layers there
    split = balanced_stages([1.0] * 12, 3, first=3.0, last=3.0)
    assert [len(r) for r in split] == [3, 6, 3]  # loads 6, 6, 6


def test_impossible_splits_are_clear_errors():
    with pytest.raises(ValueError, match="5 stages for 4 decoder layers"):
        balanced_stages([1.0] * 4, 5)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        balanced_stages([1.0] * 4, 0)
    with pytest.raises(ValueError, match=">= 0"):
        balanced_stages([1.0, -1.0], 1)


def test_tinyllamas_layers_split_by_parameters():
    """TinyLlama-1.1B: 22 equal layers of 44M parameters, a 65.5M embedding and head at the ends."""
    model = ModelShape.from_hf_config(TINYLLAMA_CONFIG)
    costs, first, last = parameter_costs(model)
    assert len(costs) == 22 and len(set(costs)) == 1
    assert first == last == 32000 * 2048
    assert sum(costs) + first + last == pytest.approx(model.params, rel=0.001)  # the norms are the rest
    split = balanced_stages(costs, 4, first, last)
    assert [len(r) for r in split] == [5, 6, 6, 5]  # the ends' 1.5 layers' worth pushes a layer inward


def draw_jobs(rng: random.Random):
    from rayft.scheduler.memory import JobShape

    return {f"j{k}": JobShape(rank=rng.choice([4, 16, 64]), tokens_per_step=rng.choice([512, 2048, 8192]),
                              max_seq_len=rng.choice([256, 512, 1024]), variant=rng.choice(["lora", "dora", "vera"]),
                              micro_batches=rng.randint(1, 4))
            for k in range(rng.randint(1, 5))}


@pytest.mark.parametrize("seed", range(30))
def test_stage_estimates_split_the_replica_and_fewest_stages_is_the_smallest_that_fits(seed):
    from rayft.scheduler.memory import GIB, adapter_bytes, estimate
    from rayft.scheduler.stages import fewest_stages, stage_estimates

    rng = random.Random(seed)
    model = ModelShape.from_hf_config(TINYLLAMA_CONFIG)
    jobs = draw_jobs(rng)
    whole = estimate(model, jobs)
    assert stage_estimates(model, jobs, 1) == [whole]
    stages = rng.randint(2, 8)
    per = stage_estimates(model, jobs, stages)
    assert len(per) == stages
    ends = model.vocab * model.hidden * model.dtype_bytes
    # every weight on one stage (the untied head, counted among "other", may be counted twice)
    assert model.weight_bytes - 1e6 <= sum(e.base for e in per) <= model.weight_bytes + ends + 1e6
    for name, job in jobs.items():  # each adapter is cut between the stages, nothing lost or doubled
        assert sum(e.adapters[name] for e in per) == adapter_bytes(job, model)
    # 1F1B keeps more in flight on earlier stages; only the last makes logits
    assert [e.logits > 0 for e in per] == [False] * (stages - 1) + [True]
    budget = int(rng.uniform(1.5, 8) * GIB)
    found = fewest_stages(model, jobs, budget)
    if found is not None:
        assert max(e.total for e in stage_estimates(model, jobs, found)) <= budget
        assert all(max(e.total for e in stage_estimates(model, jobs, s)) > budget for s in range(1, found))
        bigger = fewest_stages(model, jobs, budget * 2)
        assert bigger is not None and bigger <= found


def test_a_model_too_big_for_one_device_gets_stages():
    from rayft.scheduler.memory import GIB, JobShape
    from rayft.scheduler.stages import fewest_stages, stage_estimates

    # a 70B Llama in bf16 (about 140 GB of weights) on 80 GB devices
    llama70b = ModelShape.from_hf_config(dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                              num_attention_heads=64, num_key_value_heads=8, vocab_size=128256))
    assert llama70b.weight_bytes > 130 * GIB
    jobs = {"a": JobShape(rank=16, tokens_per_step=4096, max_seq_len=1024)}
    budget = int(80 * 0.9 * GIB)
    stages = fewest_stages(llama70b, jobs, budget)
    assert stages is not None and 2 <= stages <= 4
    assert all(e.total <= budget for e in stage_estimates(llama70b, jobs, stages))
