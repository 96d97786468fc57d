"""The scheduler's memory model against real peaks: measure, fit, and report the error per point.

For each point of a grid of (jobs, rows per job, row length, rank) it runs real fused steps
(`FusedEngine` over `Job`s, AdamW, LoRA on all seven linears) on a fresh random-init model and reads
`torch.cuda.max_memory_allocated()`. It then fits the model's coefficients to the peaks
(`rayft.scheduler.memory.fit`) and prints, per point, the measured peak, the fitted and the default
estimates and their errors. The target (issue 3): every point within 10%.

    python benchmarks/memory_model.py                 # TinyLlama-1.1B shape, bf16, on CUDA
    python benchmarks/memory_model.py --json fit.json # also write the points and the coefficients

On a machine without CUDA there is no peak to read: `--device cpu` (with `--shape tiny`) only runs
the grid's steps and prints the estimates, as a check that the script works.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import itertools
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, GIB, JobShape, ModelShape, estimate, fit  # noqa: E402

# model building and synthetic data are fused_vs_peft's: one definition of the benchmark setup
_spec = importlib.util.spec_from_file_location("fused_vs_peft", Path(__file__).with_name("fused_vs_peft.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def measure(args, jobs: int, rows: int, seq_len: int, rank: int, loss_fraction: float) -> int | None:
    """Peak bytes of two fused steps of `jobs` LoRA jobs (None off CUDA). The last `loss_fraction`
    of each row carries the loss (logits are made for those tokens only), which is what tells the
    logit term apart from the activation term in the fit."""
    from rayft.adapters import AdapterModel
    from rayft.config import AdapterConfig, JobConfig, OptimizerConfig
    from rayft.data import Encoded, job_packer
    from rayft.train.engine import FusedEngine
    from rayft.train.job import Job

    point = argparse.Namespace(**{**vars(args), "micro_batch": rows, "seq_len": seq_len, "seq_lens": [seq_len]})
    bench.start_phase(point)
    model = bench.build_model(point)
    am = AdapterModel(model)
    js = []
    for k in range(jobs):
        name = f"job{k}"
        cfg = JobConfig(name=name, adapter=name, dataset="synthetic", steps=2, tokens_per_micro_batch=rows * seq_len,
                        max_seq_len=seq_len, seed=k, optimizer=OptimizerConfig(name="adamw"))
        adapter = AdapterConfig(name=name, r=rank, alpha=2 * rank, target_modules="all-linear")
        prompt = seq_len - max(1, round(loss_fraction * seq_len))
        encoded = [Encoded(ids, [i >= prompt for i in range(len(ids))])
                   for ids in bench.job_examples(point, k, model.config.vocab_size)]
        js.append(Job.create(cfg, adapter, am, job_packer(cfg, encoded, pad_id=0)))
    engine = FusedEngine(am, args.device)
    for _ in range(2):  # the second step has the optimizer state allocated: the steady peak
        engine.step(js)
    bench.sync(point)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    del engine, js, am, model
    bench.free(point)
    return peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["tiny", "tinyllama"], default=None, help="default tinyllama on cuda, tiny on cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default bfloat16 on cuda")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rank", type=int, nargs="+", default=[8, 64])
    p.add_argument("--loss-fraction", type=float, nargs="+", default=[1.0, 0.25])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tinyllama" if args.device == "cuda" else "tiny")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.compile = False

    config = bench.model_config(args.shape).to_dict()
    model = ModelShape.from_hf_config(config, args.dtype)
    points = []
    grid = itertools.product(args.jobs, args.rows, args.seq_len, args.rank, args.loss_fraction)
    for jobs, rows, seq_len, rank, lf in grid:
        shapes = {f"job{k}": JobShape(rank=rank, tokens_per_step=rows * seq_len, max_seq_len=seq_len, loss_fraction=lf)
                  for k in range(jobs)}
        peak = measure(args, jobs, rows, seq_len, rank, lf)
        points.append({"jobs": jobs, "rows": rows, "seq_len": seq_len, "rank": rank, "loss_fraction": lf,
                       "shapes": shapes, "peak": peak})
        print(f"jobs={jobs} rows={rows} seq_len={seq_len} r={rank} loss on {lf:.0%}: "
              f"peak {'-' if peak is None else f'{peak / GIB:.2f} GiB'}", flush=True)

    measured = [pt for pt in points if pt["peak"]]
    coef = fit([(model, pt["shapes"], pt["peak"]) for pt in measured]) if len(measured) >= 4 else None
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    cmd = "python benchmarks/memory_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"\n{_dt.date.today()} · {device} · {args.shape} {args.dtype} · `{cmd.strip()}`\n")
    print("| jobs | rows | seq len | r | loss tokens | measured GiB | fitted GiB | fitted error | default GiB | default error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pt in points:
        default = estimate(model, pt["shapes"]).total
        fitted = estimate(model, pt["shapes"], coef).total if coef else None
        def err(e, pt=pt):
            return "-" if pt["peak"] is None or e is None else f"{(e - pt['peak']) / pt['peak']:+.1%}"
        print(f"| {pt['jobs']} | {pt['rows']} | {pt['seq_len']} | {pt['rank']} | {pt['loss_fraction']:.0%} | "
              f"{'-' if pt['peak'] is None else gib(pt['peak'])} | {'-' if fitted is None else gib(fitted)} | "
              f"{err(fitted)} | {gib(default)} | {err(default)} |")
    if coef:
        print(f"\nfitted: token={coef.token:.2f} attn={coef.attn:.3f} logit={coef.logit:.2f} "
              f"workspace={coef.workspace / GIB:.2f} GiB; max error {coef.fitted_error:.1%} (target 10%)")
        print(f"default: token={DEFAULT_COEFFICIENTS.token} attn={DEFAULT_COEFFICIENTS.attn} "
              f"logit={DEFAULT_COEFFICIENTS.logit} workspace={DEFAULT_COEFFICIENTS.workspace / GIB:.2f} GiB")
    else:
        print("\nno peaks measured (not CUDA): nothing to fit")
    out = {"points": [{k: v for k, v in pt.items() if k != "shapes"} for pt in points],
           "coefficients": None if coef is None else vars(coef)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
