"""Generate the real-model demo's task datasets (alpaca JSONL) deterministically.

    python configs/smollm2/make_data.py         # rewrites configs/smollm2/<task>.jsonl

Three tasks SmolLM2-135M-Instruct fails zero-shot (configs/smollm2.yaml's eval table shows the base's
score beside each adapter's): reverse the order of a sentence's words; write a name "First Last" as
"LAST, First"; move a sentence's last word to its front. (Tasks on letters inside words, such as
"the last letter of every word", stayed at 0 % after 60 steps: the byte-level BPE model sees words,
not letters; measured 2026-12-01.) Inputs are drawn from fixed word and name lists;
each input appears once per task, so a held-out split of rows is a split of unseen inputs.
"""

from __future__ import annotations

import random
from pathlib import Path

from rayft.data.formats import write_task_files

HERE = Path(__file__).resolve().parent
SEED = 4321
ROWS = 400

WORDS = """apple river stone cloud garden window silver market yellow forest candle rabbit orange
winter bridge pocket planet castle dragon summer island letter mirror button coffee engine
finger guitar hammer jacket kitten ladder monkey needle ocean pencil puzzle rocket saddle tiger
turtle violin wallet zebra anchor basket camera desert feather helmet lantern meadow parrot
pillow quartz shadow sugar thunder valley wagon yogurt blanket carpet dinner falcon glacier
harbor jungle kettle lemon marble napkin oyster pepper riddle spider tunnel velvet walnut""".split()
FIRST = """Ada Alan Grace Linus Marie Isaac Rosa Nikola Emmy Carl Hedy Niels Barbara Claude Dorothy
Edsger Frances John Katherine Leonhard Margaret Richard Sophie Tim Ursula Werner Yuri Zora
Albert Bertha Charles Diana Ernest Florence George Helen Irene James Karen Louis Miriam Oscar
Pierre Quentin Ruth Samuel Theresa Victor Wanda Xavier Yvonne""".split()
LAST = """Lovelace Turing Hopper Torvalds Curie Newton Parks Tesla Noether Sagan Lamarr Bohr Liskov
Shannon Hodgkin Dijkstra Allen Backus Johnson Euler Hamilton Feynman Germain Berners Franklin
Heisenberg Gagarin Hurston Einstein Benz Darwin Spencer Hemingway Nightingale Boole Keller
Joliot Watt Horney Pasteur Mahler Wilde Tarantino Morse Hugo Wright Huxley Lang Lopez""".split()

TASKS = {
    "reverse": "Reverse the order of the words.",
    "surname": "Write the name as SURNAME, First name.",
    "rotate": "Move the last word to the front.",
}


def inputs(task: str, n: int, rng: random.Random) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        if task == "surname":
            seen.setdefault(f"{rng.choice(FIRST)} {rng.choice(LAST)}", None)
        else:
            seen.setdefault(" ".join(rng.sample(WORDS, rng.randint(3, 5))), None)
    return list(seen)


def answer(task: str, text: str) -> str:
    if task == "reverse":
        return " ".join(reversed(text.split()))
    if task == "surname":
        first, last = text.split()
        return f"{last.upper()}, {first}"
    words = text.split()
    return " ".join([words[-1], *words[:-1]])


def rows(task: str, n: int = ROWS, seed: int = SEED) -> list[dict]:
    rng = random.Random(f"{seed}-{task}")
    return [{"instruction": TASKS[task], "input": x, "output": answer(task, x)} for x in inputs(task, n, rng)]


def main(out_dir: Path = HERE) -> None:
    write_task_files(out_dir, TASKS, rows)


if __name__ == "__main__":
    main()
