"""Staged replicas: throughput and the measured pipeline bubble for 1, 2 and 4 stages and K jobs.

Each (stages, K) runs K LoRA jobs (r=8, all linears, one micro-batch per step) on a real replica:
one `ReplicaWorker` actor for 1 stage, a `StagedReplica` of stage actors (placement group,
torch.distributed: gloo on CPUs, NCCL on GPUs) otherwise. After one warm-up step, one call runs
`--steps` optimizer steps of every job, which a staged replica schedules as one 1F1B pipeline
(drained once, at the end). Printed per row:

- tokens/s of the call (all jobs' real tokens);
- the measured bubble: the share of all stages' time spent waiting for a neighbour (receives and
  the gradient-norm reductions), from the stages' own clocks;
- the schedule's bubble: the same pipeline order replayed by `rayft.scheduler.pipeline.simulate`
  with forward = 1, backward = 2 (what the order itself costs, before any real timing);
- mLoRA's formula max((S - K) / S, 0), and GPipe's (S - 1) / (K + S - 1) for a pipeline drained
  every step.

On CPUs the stages share the machine's cores, so absolute numbers mean little; the bubble and its
fall with K are the result. On GPUs (`--device cuda`) each stage gets one GPU.

    python benchmarks/pipeline_stages.py                       # CPU: 1, 2, 4 stages x K = 1, 2, 4, 8
    python benchmarks/pipeline_stages.py --device cuda --model path/to/model
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def run_config(model: str, device: str, jobs: int, steps: int, tokens: int):
    from rayft.config import parse_config

    data = [ROOT / "configs" / "demo" / f"{name}.jsonl" for name in ("length", "earliest", "latest")]
    return parse_config({
        "base_model": {"path": model, "make_if_missing": "tiny", "device": device,
                       "dtype": "float32" if device == "cpu" else "bfloat16"},
        "adapters": [{"name": f"a{k}", "r": 8, "alpha": 16} for k in range(jobs)],
        "datasets": [{"name": f"d{k}", "path": str(data[k % 3])} for k in range(jobs)],
        "jobs": [{"adapter": f"a{k}", "dataset": f"d{k}", "steps": steps + 1, "tokens_per_micro_batch": tokens,
                  "max_seq_len": min(tokens, 128), "seed": k} for k in range(jobs)],
    })


def measure(ray, stages: int, jobs: int, args, out: Path) -> dict:
    from rayft.cluster.replica import ReplicaWorker
    from rayft.cluster.staged import StagedReplica

    cfg = run_config(args.model, args.device, jobs, args.steps, args.tokens)
    gpu = args.device == "cuda"
    cpus = ray.cluster_resources().get("CPU", 1)
    if stages == 1:
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus}
        replica = ray.remote(ReplicaWorker).options(**options).remote(cfg, str(out), None if gpu else int(cpus))
    else:
        replica = ray.remote(StagedReplica).options(num_cpus=0).remote(
            cfg, str(out), stages, gpu=gpu, cpus_per_stage=1.0 if gpu else cpus / stages)
    ray.get(replica.step.remote(1))  # warm-up: one step of every job
    t0 = time.perf_counter()
    report = ray.get(replica.step.remote(args.steps))
    wall = time.perf_counter() - t0
    if stages > 1:
        ray.get(replica.shutdown.remote())  # its placement group would outlive it
    ray.kill(replica)
    return {"tokens_per_s": report["tokens"] / report["seconds"], "bubble": report.get("bubble", 0.0), "wall": wall}


def scheduled_bubble(stages: int, jobs: int, steps: int) -> float:
    from rayft.scheduler.pipeline import pipeline_slots, simulate, slot_orders

    slots = pipeline_slots([1] * jobs, steps, stages)
    return simulate(slot_orders(slots, stages), 1.0, 2.0).bubble(stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="1,2,4")
    p.add_argument("--jobs", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per job in the measured call")
    p.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch of each job")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=str(ROOT.parent / ".cache" / "tiny-llama"),
                   help="a model directory (the tiny model is built there if absent)")
    args = p.parse_args(argv)

    import ray

    from rayft.model.load import ensure_model
    from rayft.scheduler.pipeline import gpipe_bubble, mlora_bubble

    ensure_model(run_config(args.model, args.device, 1, 1, args.tokens).base_model)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="rayft-bench-pipeline-")  # fresh: nothing to resume from
    try:
        for stages in (int(s) for s in args.stages.split(",")):
            for jobs in (int(k) for k in args.jobs.split(",")):
                got = measure(ray, stages, jobs, args, Path(scratch.name) / f"s{stages}k{jobs}")
                row = (stages, jobs, got["tokens_per_s"], got["bubble"], scheduled_bubble(stages, jobs, args.steps),
                       mlora_bubble(stages, jobs), gpipe_bubble(stages, jobs))
                rows.append(row)
                print(f"stages {stages}  K {jobs}  {row[2]:8.0f} tok/s  bubble measured {row[3]:6.1%}  "
                      f"schedule {row[4]:6.1%}  mLoRA {row[5]:6.1%}  GPipe per step {row[6]:6.1%}", flush=True)
    finally:
        ray.shutdown()
        scratch.cleanup()
    device = platform.processor() or platform.machine()
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name(0)
    print(f"\n{_dt.date.today()}, {device}, {os.cpu_count()} CPUs: "
          f"`python benchmarks/pipeline_stages.py {shlex.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| stages | jobs K | tokens/s | bubble, measured | bubble, schedule | mLoRA max((S-K)/S,0) | GPipe (S-1)/(K+S-1) |")
    print("|---|---|---|---|---|---|---|")
    for s, k, tps, measured, sched, mlora, gpipe in rows:
        print(f"| {s} | {k} | {tps:,.0f} | {measured:.1%} | {sched:.1%} | {mlora:.1%} | {gpipe:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
