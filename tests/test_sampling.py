"""Batched sampling (all rows in one go, no read-back per row): each row's token is the inverse CDF
of its own distribution at its own draw, whatever else is in the batch, even a row of NaN."""

import random

import torch

from rayft.serving.engine import sample_tokens

TEMPERATURES = [1e-45, 1e-8, 0.3, 0.7, 1.0, 2.0]
TOP_PS = [1.0, 1.0, 0.95, 0.5, 0.1, 1e-9]


def reference(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> tuple[int, float]:
    """The token at draw `u` in float64 (in order of probability for a nucleus), and how far `u`
    lies from the nearest CDF step (cases too close to one are left out: float32 may round across)."""
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / max(temperature, 1e-300), dim=-1)
    order = torch.arange(len(probs))
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1) / probs.sum()
    j = int((cdf > u).nonzero()[0])
    return int(order[j]), float((cdf - u).abs().min())


def random_batch(rng: random.Random, rows: int, vocab: int):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(rows, vocab, generator=g) * rng.choice([0.5, 2.0, 8.0])
    temperature = torch.tensor([rng.choice(TEMPERATURES) for _ in range(rows)])
    top_p = torch.tensor([rng.choice(TOP_PS) for _ in range(rows)])
    uniforms = torch.tensor([rng.random() for _ in range(rows)])
    return logits, temperature, top_p, uniforms


def test_each_row_samples_its_own_distribution_at_its_own_draw():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        logits, temperature, top_p, uniforms = random_batch(rng, rng.randint(1, 6), rng.choice([5, 50, 500]))
        got = sample_tokens(logits, temperature, top_p, uniforms, nucleus=bool((top_p < 1).any()))
        for k in range(len(logits)):
            want, margin = reference(logits[k], float(temperature[k]), float(top_p[k]), float(uniforms[k]))
            if margin > 1e-5:
                assert int(got[k]) == want, (k, float(temperature[k]), float(top_p[k]))
                checked += 1
    assert checked > 800


def test_a_rows_token_does_not_depend_on_its_batch():
    rng = random.Random(1)
    for _ in range(200):
        logits, temperature, top_p, uniforms = random_batch(rng, rng.randint(2, 8), 64)
        bad = rng.randrange(len(logits))
        logits[bad, rng.randrange(64)] = rng.choice([float("nan"), float("inf"), float("-inf")])
        batch = sample_tokens(logits, temperature, top_p, uniforms, nucleus=True)
        assert ((batch >= 0) & (batch < 64)).all(), "even a row of NaN picks a token in range"
        for k in range(len(logits)):
            if k == bad:
                continue
            one = slice(k, k + 1)
            alone = sample_tokens(logits[one], temperature[one], top_p[one], uniforms[one], nucleus=bool(top_p[k] < 1))
            assert int(batch[k]) == int(alone[0]), (k, float(top_p[k]))


def test_a_tiny_temperature_or_nucleus_is_the_argmax():
    rng = random.Random(2)
    for _ in range(100):
        logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 3
        uniforms = torch.tensor([rng.random() for _ in range(4)])
        for temperature, top_p in ((1e-45, 1.0), (5e-324, 1.0), (1.0, 1e-9)):
            got = sample_tokens(logits, torch.full((4,), temperature), torch.full((4,), top_p), uniforms)
            assert torch.equal(got, logits.argmax(-1))
