"""A dataset config -> the training examples and the held-out ones."""

from __future__ import annotations

import random

from rayft.config import DatasetConfig

from .formats import DataError, load_examples


def load_splits(cfg: DatasetConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows. The eval split is a fixed function of the file, not of any job's seed,
    so every job and every run evaluates on the same held-out rows."""
    rows = load_examples(cfg.path, cfg.format)
    if cfg.eval_path is not None:
        return rows, load_examples(cfg.eval_path, cfg.format)
    if cfg.eval_split == 0:
        return rows, []
    n_eval = max(1, round(len(rows) * cfg.eval_split))
    if n_eval >= len(rows):
        raise DataError(f"{cfg.path}: eval_split={cfg.eval_split} leaves no training rows of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(f"rayft-eval-split:{cfg.name}").shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
