"""The run directory's layout: only names rayft writes are read back as checkpoints."""

import random

from rayft import layout


def _near_miss(rng: random.Random) -> str:
    good = layout.checkpoint_name(rng.randrange(10**8))
    edits = [
        lambda s: s + "\n",
        lambda s: s + rng.choice([" ", ".tmp", "x", "0"]),
        lambda s: rng.choice(["x", " ", "\n", "."]) + s,
        lambda s: s[:-1],
        lambda s: s.replace(s[-1], "\u0661"),  # an Arabic-Indic digit: \d would take it
        lambda s: s.replace("ckpt", "CKPT"),
        lambda s: s[:5] + "+" + s[6:],
    ]
    return rng.choice(edits)(good)


def _written_by_rayft(name: str) -> bool:
    return len(name) == 13 and name.startswith("ckpt-") and all(c in "0123456789" for c in name[5:])


def test_checkpoint_names_are_exactly_the_ones_written():
    rng = random.Random(0)
    for _ in range(500):
        step = rng.randrange(10**8)
        m = layout.CHECKPOINT_NAME.match(layout.checkpoint_name(step))
        assert m is not None and int(m.group(1)) == step
        other = _near_miss(rng)
        assert (layout.CHECKPOINT_NAME.match(other) is not None) == _written_by_rayft(other), repr(other)
