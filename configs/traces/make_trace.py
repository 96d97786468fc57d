"""Write configs/traces/mixed.jsonl: a mixed multi-LoRA workload for `rayft simulate` (deterministic).

40 fine-tuning jobs arrive as a Poisson stream (mean gap 45 s). Each is one of four kinds, with
example lengths drawn from a log-normal (real SFT corpora are long-tailed: most examples are much
shorter than the longest), clipped to [64, max_seq_len]; each job lists 64 such lengths as its
empirical distribution. Ranks are 8-64, micro-batches 4096 or 8192 tokens, 2-12 M tokens per job.

    python configs/traces/make_trace.py [--seed 0] [--out configs/traces/mixed.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

# kind: (max_seq_len, median example length, log-normal sigma, micro-batch token choices, weight)
KINDS = {
    "chat": (512, 160, 0.6, (4096,), 0.35),
    "instruct": (1024, 320, 0.7, (4096, 8192), 0.30),
    "summarize": (2048, 700, 0.6, (4096, 8192), 0.20),
    "longdoc": (4096, 1400, 0.6, (8192,), 0.15),
}


def make(seed: int = 0, n: int = 40, mean_gap_s: float = 45.0) -> list[dict]:
    rng = random.Random(seed)
    jobs, t = [], 0.0
    names, weights = list(KINDS), [k[-1] for k in KINDS.values()]
    for i in range(n):
        kind = rng.choices(names, weights)[0]
        max_len, median, sigma, mbts, _ = KINDS[kind]
        lens = [min(max_len, max(64, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(64)]
        jobs.append({
            "name": f"{kind}-{i:02d}", "arrival": round(t, 1), "rank": rng.choice([8, 16, 32, 64]),
            "max_seq_len": max_len, "seq_lens": lens, "tokens": rng.randrange(2_000_000, 12_000_001, 250_000),
            "priority": 1 if rng.random() < 0.15 else 0, "micro_batch_tokens": rng.choice(mbts),
        })
        t += rng.expovariate(1.0 / mean_gap_s)
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("mixed.jsonl")))
    args = ap.parse_args()
    Path(args.out).write_text("".join(json.dumps(j, separators=(",", ":")) + "\n" for j in make(args.seed)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
