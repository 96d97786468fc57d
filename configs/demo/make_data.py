"""Generate the demo's task datasets (alpaca JSONL) and its preference pairs deterministically.

    python configs/demo/make_data.py            # rewrites configs/demo/<task>.jsonl

Every task reads one random string of 3-8 letters, spelled one token per letter by the tiny
model's character-level tokenizer. A row is `{"instruction": ..., "input": <string>, "output":
<answer>}`; each string appears once per task, so a held-out split of rows is a split of unseen
inputs. configs/demo.yaml gives the prompt template; the loss is on the answer and eos.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from rayft.data.formats import write_task_files

HERE = Path(__file__).resolve().parent
SEED = 1234
ROWS = 1000

# Tasks a 0.8M-parameter random-init base can learn with LoRA in a CPU minute: each answer is one
# token read off the whole input (its length, its alphabetically first or last letter). The
# instructions are in capitals and the template has no lower-case letter (configs/demo.yaml), so
# the only lower-case letters in a prompt are the input's: "first in the alphabet" otherwise also
# sees the instruction's own letters. Copying
# tasks (upper-casing, reversing) need a base that can already copy from its input; measured on
# 2026-11-22, neither the random base nor one pre-trained for two CPU minutes can (0% exact match).
TASKS = {
    "length": ("HOW MANY LETTERS?", lambda w: str(len(w))),
    "earliest": ("FIRST IN THE ALPHABET?", min),
    "latest": ("LAST IN THE ALPHABET?", max),
}


def strings(n: int, seed: int, min_len: int = 3, max_len: int = 8) -> list[str]:
    """n distinct random lower-case strings. Random letters, not dictionary words: every answer
    is then about equally likely (in English words 'a' is the earliest letter half the time)."""
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        seen.setdefault("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len))), None)
    return list(seen)


def rows(task: str, n: int = ROWS, seed: int = SEED) -> list[dict]:
    instruction, fn = TASKS[task]
    return [{"instruction": instruction, "input": w, "output": fn(w)} for w in strings(n, f"{seed}-{task}")]


# Preference pairs (configs/preference.yaml): the same prompt as the alpaca rows' (the template is
# written out), the right answer chosen and the opposite one rejected.
PREFERENCES = {"prefer_latest": ("latest", "earliest")}


def pairs(name: str, n: int = ROWS, seed: int = SEED) -> list[dict]:
    right, wrong = PREFERENCES[name]
    (instruction, fn), (_, other) = TASKS[right], TASKS[wrong]
    return [{"prompt": f"{instruction}\n{w}\n= ", "chosen": fn(w), "rejected": other(w)}
            for w in strings(n, f"{seed}-{name}") if fn(w) != other(w)]


def main(out_dir: Path = HERE) -> None:
    write_task_files(out_dir, TASKS, rows)
    write_task_files(out_dir, PREFERENCES, pairs)


if __name__ == "__main__":
    main()
