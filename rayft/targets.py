"""Which layers an adapter's `target_modules` selects: one rule for the adapter injection and the
memory model. Pure Python (the scheduler imports it; it must stay free of torch).

The rule is PEFT's, so a config means here what it means there:
  - 'all-linear' (any case): every candidate layer;
  - any other string: a regex, fullmatched against the full module name;
  - a list: exact module names, or name suffixes that follow a '.' ("q_proj" matches
    "model.layers.0.self_attn.q_proj", not "model.layers.0.self_attn.xq_proj").
The candidates are the model's adaptable linear layers, its output head excluded (as PEFT's
'all-linear' does); finding them needs the module tree, so the caller passes their names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from rayft.config import ALL_LINEAR


def targets_all(target_modules: str | Sequence[str]) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def target_regex(target_modules: str) -> re.Pattern:
    """The compiled regex of a string `target_modules`; a ValueError that quotes it if it is not one."""
    try:
        return re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None


def select_targets(target_modules: str | Sequence[str], names: Iterable[str]) -> list[str]:
    """The candidate names (full dotted module paths) `target_modules` selects, in the given order."""
    if targets_all(target_modules):
        return list(names)
    if isinstance(target_modules, str):
        pattern = target_regex(target_modules)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
