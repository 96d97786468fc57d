"""Generate the demo's task datasets (alpaca JSONL) deterministically.

    python configs/demo/make_data.py            # rewrites configs/demo/<task>.jsonl

Every task is a string transformation of one word from the word list the tiny model ships
(`rayft/model/corpus/words.txt`), so the model's character-level tokenizer spells each word one
token per letter. A row is `{"instruction": ..., "input": <word>, "output": <answer>}`; each word
appears once per task, so a held-out split of rows is a split of unseen words.

Status: with the tiny base pre-trained for ~1 minute, PEFT LoRA (r=16, all linears) did not yet
learn upper/reverse/sort/twice in a CPU-sized budget (0% exact match after 150 steps of 16 rows);
"last" reached 20% (mostly by answering "e"). The base needs a stronger copy mechanism first; see
rayft/model/tiny.py.

Suggested prompt template (Jinja2, alpaca rows): "{{ instruction }}\\n{{ input }}\\n### Answer:\\n"
with the loss on the output tokens and the eos token only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = HERE.parents[1] / "rayft" / "model" / "corpus" / "words.txt"
SEED = 1234

TASKS = {
    "upper": ("Write the word in capital letters.", str.upper),
    "reverse": ("Write the word backwards.", lambda w: w[::-1]),
    "sort": ("Sort the letters of the word alphabetically.", lambda w: "".join(sorted(w))),
    "twice": ("Write the word twice.", lambda w: f"{w} {w}"),
    "last": ("Write the last letter of the word.", lambda w: w[-1]),
    "length": ("How many letters does the word have?", lambda w: str(len(w))),
}


def words(min_len: int = 3, max_len: int = 8) -> list[str]:
    seen: dict[str, None] = {}
    for w in WORDS.read_text().split():
        if min_len <= len(w) <= max_len:
            seen.setdefault(w, None)
    return list(seen)


def rows(task: str, seed: int = SEED) -> list[dict]:
    instruction, fn = TASKS[task]
    ws = words()
    random.Random(f"{seed}-{task}").shuffle(ws)
    return [{"instruction": instruction, "input": w, "output": fn(w)} for w in ws]


def main(out_dir: Path = HERE) -> None:
    for task in TASKS:
        path = out_dir / f"{task}.jsonl"
        data = rows(task)
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{path}: {len(data)} rows")


if __name__ == "__main__":
    main()
