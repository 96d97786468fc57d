"""What merging and compressing adapters costs in quality: a config's adapters trained as `rayft
train` trains them, then every task scored (held-out greedy exact match and answer-token eval
loss) with its own adapter, with it rebuilt from a shared subspace of all the adapters at a few k
(`rayft compress`), and with one merged multi-task adapter (`rayft merge`: linear, the exact
weighted sum, and ties at density 0.5).

    python benchmarks/adapter_algebra.py configs/demo.yaml --steps 200

Every adapter is made LoRA (merging and compressing need LoRA; the demo's DoRA one becomes LoRA of
the same rank). The run ends with a markdown table for the README.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_vs_peft import eval_loss  # noqa: E402


def score(am, tokenizer, adapter_dir: Path, rows: list[dict], template, new_tokens: int) -> tuple[float, float]:
    """(exact match, eval loss) of the adapter at `adapter_dir` on a task's held-out rows (`am`: the
    base's AdapterModel, one for all scores: a model's layers are wrapped once)."""
    from rayft.adapters import load_adapter
    from rayft.data import encode_example, prompt_and_answer
    from rayft.train.evaluate import exact_match, greedy_generate

    load_adapter(am, adapter_dir, "scored")
    try:
        pairs = [prompt_and_answer(r, tokenizer, template) for r in rows]
        predictions = greedy_generate(am, tokenizer, [p for p, _ in pairs], "scored", new_tokens)
        encoded = [encode_example(r, tokenizer, template) for r in rows]
        loss = eval_loss(am.model, encoded, lambda: am.use("scored", rows=1))
        return exact_match(predictions, [a for _, a in pairs]), loss
    finally:
        am.remove_adapter("scored")


def run(config: str, steps: int, eval_examples: int, out: Path, ks: list[int]) -> list[dict]:
    from rayft.adapters.compress import compress, decompress, reconstruction_errors
    from rayft.adapters.merge import merge, read_lora, save_merge
    from rayft.config import load_config
    from rayft.model.load import load_base_model
    from rayft.train.trainer import Trainer

    cfg = load_config(config)
    jobs = [jc.model_copy(update={"steps": steps, "epochs": None, "checkpoint_every": None}) for jc in cfg.jobs]
    adapters = [a.model_copy(update={"variant": "lora"}) for a in cfg.adapters]
    cfg = cfg.model_copy(update={"jobs": jobs, "adapters": adapters})
    trainer = Trainer(cfg, out / "train")
    trainer.run()
    dirs = {jc.name: out / "train" / "adapters" / jc.adapter for jc in cfg.jobs}
    loras = {name: read_lora(d) for name, d in dirs.items()}
    variants: dict[str, dict[str, Path]] = {"own": dirs}
    errors: dict[str, dict[str, float]] = {}
    for k in ks:
        space = compress(loras, components=k)
        errors[f"subspace k={k}"] = reconstruction_errors(space, loras)
        variants[f"subspace k={k}"] = decompress(space, out / f"k{k}")
    for method, extra in (("linear", {}), ("ties", {"density": 0.5, "rank": 10**4})):
        path = save_merge(merge(list(loras.values()), method, **extra), out / f"merged-{method}")
        variants[f"merged ({method})"] = {name: path for name in dirs}
    from rayft.adapters import AdapterModel

    base, tokenizer = load_base_model(cfg.base_model)
    am = AdapterModel(base)
    rows = []
    for jc in cfg.jobs:
        held = trainer.eval_rows[jc.name][:eval_examples]
        template = cfg.dataset(jc.dataset).template
        for variant, paths in variants.items():
            em, loss = score(am, tokenizer, paths[jc.name], held, template, cfg.eval.max_new_tokens)
            rows.append({"task": jc.name, "adapter": variant, "exact_match": em, "eval_loss": loss,
                         "reconstruction_error": errors.get(variant, {}).get(jc.name)})
            print(f"{jc.name:10s} {variant:18s} exact match {em:.2f}  eval loss {loss:.3f}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| task | adapter | reconstruction error | exact match | eval loss |", "|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["reconstruction_error"] is None else f"{r['reconstruction_error']:.1%}"
        lines.append(f"| {r['task']} | {r['adapter']} | {err} | {r['exact_match']:.0%} | {r['eval_loss']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--components", default="1,2", help="subspace sizes to score, comma-separated")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.config, args.steps, args.eval_examples, Path(tmp), [int(k) for k in args.components.split(",")])
    print(markdown(rows))


if __name__ == "__main__":
    main()
