"""rayft's fused multi-adapter step vs. PEFT job by job vs. the frozen base alone, in one run.

Same model shape, same random token data, same token counts for all three measurements:

1. rayft fused: K LoRA jobs (r=16, alpha=32, all linears, AdamW) trained together by the real engine
   (`FusedEngine.step` over `Job`s made by `Job.create`), B rows of `seq_len` tokens per job, so
   K*B rows per fused step. With `--seq-lens 64,256,1024` job k's rows are the k-th length (cycling):
   a mixed-length workload, where a rectangular batch would pad every row to the longest.
2. PEFT, job by job: the same K jobs, each `get_peft_model(base, LoraConfig(r=16, lora_alpha=32,
   target_modules="all-linear"))` trained one after another at micro-batch B (forward with labels,
   backward, clip, AdamW step, zero_grad), then `unload()`ed so the next job starts from the clean base.
3. The frozen base alone on the same rows, no LoRA: forward and backward through every layer (the
   input embeddings require grad, so backward traverses the network as it does with LoRA): the
   limit. Rows of one length form one batch (K*B rows when all jobs share a length; one batch per
   length otherwise, so the limit carries no padding either).

Each measurement gets a fresh model instance built from the same seed; warm-up steps are excluded;
on CUDA the timings are bracketed by `torch.cuda.synchronize()` and memory is freed between phases.

    python benchmarks/fused_vs_peft.py --shape tiny --device cpu
    python benchmarks/fused_vs_peft.py --shape tinyllama --device cuda      # DESIGN.md's setup
    python benchmarks/fused_vs_peft.py --shape smollm2 --device cpu --seq-lens 64,256,1024 -K 3 -B 1

`--shape smollm2` is the real SmolLM2-135M-Instruct (its GGUF file, dequantised; built once).

The run ends with a markdown table (header + one row) to paste into the README.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

# Runnable as a plain script from anywhere in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayft.scheduler.memory import TINYLLAMA_CONFIG  # noqa: E402  (pure Python, no Ray)

R, ALPHA = 16, 32
LR = 2e-4
MAX_GRAD_NORM = 1.0  # rayft's JobConfig default; HF Trainer clips at 1.0 too

# TinyLlama-1.1B's shape, as the scheduler's memory model knows it (one definition)
TINYLLAMA_SHAPE = dict(TINYLLAMA_CONFIG, max_position_embeddings=2048)


# ------------------------------------------------------------------------------------------ setup


def model_config(shape: str):
    from transformers import LlamaConfig

    if shape == "tinyllama":
        dims = dict(TINYLLAMA_SHAPE)
    else:
        from rayft.model.tiny import ALPHABET, MODEL_SHAPE, SPECIAL_TOKENS

        dims = dict(MODEL_SHAPE, vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET))
    return LlamaConfig(
        **dims,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def build_model(args, seed: int = 0):
    """A fresh random-init LlamaForCausalLM (or the real SmolLM2), on the device in the run's dtype, frozen."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if args.device == "cuda":
        torch.cuda.manual_seed_all(seed)
    if args.shape == "smollm2":
        from rayft.model.gguf import smollm2_model_dir

        model = LlamaForCausalLM.from_pretrained(smollm2_model_dir(), dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(args.device)
    else:
        with torch.device(args.device):
            model = LlamaForCausalLM._from_config(
                model_config(args.shape), dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    return model


def job_len(args, k: int) -> int:
    """Tokens per row of job k: --seq-len, or the k-th of --seq-lens (cycling)."""
    return args.seq_lens[k % len(args.seq_lens)]


def job_examples(args, k: int, vocab: int) -> list[list[int]]:
    """Job k's synthetic data: 4*B examples of exactly its row length in random token ids (one example per row)."""
    g = torch.Generator().manual_seed(1000 + k)
    ids = torch.randint(0, vocab, (4 * args.micro_batch, job_len(args, k)), generator=g)
    return ids.tolist()


def step_tokens(args) -> int:
    """Tokens of one fused step: every job's B rows."""
    return args.micro_batch * sum(job_len(args, k) for k in range(args.jobs))


def rectangular_padding(args) -> float:
    """The padding a rectangular batch of all jobs' rows (each right-padded to the longest) would carry."""
    width = max(job_len(args, k) for k in range(args.jobs))
    return 1.0 - step_tokens(args) / (args.jobs * args.micro_batch * width)


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def free(args) -> None:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def start_phase(args) -> None:
    free(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(args) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None


def maybe_compile(args, model) -> None:
    """--compile: compile each decoder layer in place, as `base_model.compile` does (the module tree,
    and so PEFT/rayft wrapping, stays)."""
    if args.compile:
        from rayft.train.engine import compile_layers

        # PEFT re-wraps the layers' linears for every job: each job recompiles
        compile_layers(model.get_decoder(), recompile_limit=4 * args.jobs + 16)


# --------------------------------------------------------------------------------------- phase 1


def run_fused(args) -> dict:
    from rayft.adapters import AdapterModel
    from rayft.config import AdapterConfig, JobConfig, OptimizerConfig
    from rayft.data import Encoded, job_packer
    from rayft.train.engine import FusedEngine
    from rayft.train.job import Job

    start_phase(args)
    model = build_model(args)
    vocab = model.config.vocab_size
    am = AdapterModel(model)
    jobs = []
    for k in range(args.jobs):
        name = f"job{k}"
        cfg = JobConfig(
            name=name,
            adapter=name,
            dataset="synthetic",
            steps=args.warmup + args.steps,
            tokens_per_micro_batch=args.micro_batch * job_len(args, k),
            max_seq_len=job_len(args, k),
            seed=k,
            optimizer=OptimizerConfig(name="adamw", lr=LR, max_grad_norm=MAX_GRAD_NORM),
        )
        adapter = AdapterConfig(name=name, variant="lora", r=R, alpha=ALPHA, target_modules="all-linear")
        encoded = [Encoded(ids, [True] * len(ids)) for ids in job_examples(args, k, vocab)]
        jobs.append(Job.create(cfg, adapter, am, job_packer(cfg, encoded, pad_id=0)))
    maybe_compile(args, model)
    engine = FusedEngine(am, args.device)

    for _ in range(args.warmup):
        s = engine.step(jobs)
        assert s.padding == 0.0, f"the fused stream should carry no padding, got {s.padding:.3f}"
    sync(args)
    from rayft.train.engine import compiled_graphs

    graphs = compiled_graphs()
    tokens, attention_pad, t0 = 0, 0, time.perf_counter()
    for _ in range(args.steps):
        s = engine.step(jobs)
        tokens += s.tokens
        attention_pad += s.attention_pad_slots
    sync(args)
    seconds = time.perf_counter() - t0
    assert tokens == args.steps * step_tokens(args), tokens
    loss = sum(j.history[-1].loss for j in jobs) / len(jobs)
    result = dict(tokens=tokens, seconds=seconds, loss=loss, peak_gib=peak_gib(args), padding=s.padding,
                  recompiles=compiled_graphs() - graphs,
                  attention_padding=attention_pad / (attention_pad + tokens),
                  adapter_dtype=str(next(iter(am.adapter_parameters("job0").values())).dtype))
    del engine, jobs, am, model
    free(args)
    return result


def timed_steps(args, step) -> tuple[float, torch.Tensor]:
    """Run args.warmup untimed steps, then args.steps timed ones; (seconds, last step's result)."""
    for i in range(args.warmup):
        step(i)
    sync(args)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        out = step(i)
    sync(args)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------- phase 2


def run_peft(args) -> dict:
    from peft import LoraConfig, get_peft_model

    from rayft.config import OptimizerConfig
    from rayft.train.optim import build_optimizer

    start_phase(args)
    base = build_model(args)
    vocab = base.config.vocab_size
    maybe_compile(args, base)
    autocast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.peft_autocast and args.dtype == "bfloat16"
        else None
    )
    tokens, seconds, losses, adapter_dtype = 0, 0.0, [], None
    for k in range(args.jobs):
        data = torch.tensor(job_examples(args, k, vocab), device=args.device)  # (4B, L)
        batches = data.split(args.micro_batch)
        torch.manual_seed(k)
        model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        adapter_dtype = str(params[0].dtype)
        opt = build_optimizer([{"params": params}], OptimizerConfig(name="adamw", lr=LR))  # rayft's: fused on GPU

        # the loop's objects bound as defaults: `del` below frees them between jobs
        def step(i: int, batches=batches, model=model, params=params, opt=opt) -> torch.Tensor:
            ids = batches[i % len(batches)]
            if autocast is not None:
                with autocast:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        took, loss = timed_steps(args, step)
        seconds += took
        tokens += args.steps * args.micro_batch * job_len(args, k)
        losses.append(float(loss))
        del opt, params, step, loss
        base = model.unload()  # the clean base again: LoRA layers removed, nothing merged
        del model, data, batches
        free(args)
    result = dict(tokens=tokens, seconds=seconds, loss=sum(losses) / len(losses), peak_gib=peak_gib(args),
                  adapter_dtype=adapter_dtype)
    del base
    free(args)
    return result


# --------------------------------------------------------------------------------------- phase 3


def run_frozen(args) -> dict:
    start_phase(args)
    model = build_model(args)
    vocab = model.config.vocab_size
    maybe_compile(args, model)
    embed = model.get_input_embeddings()
    # step i: every job's i-th micro-batch (of 4), rows of one length stacked into one batch
    by_len: dict[int, list[torch.Tensor]] = {}
    for k in range(args.jobs):
        data = torch.tensor(job_examples(args, k, vocab), device=args.device).view(4, args.micro_batch, -1)
        by_len.setdefault(job_len(args, k), []).append(data)
    groups = [torch.cat(parts, dim=1) for parts in by_len.values()]  # (4, rows of that length, L)

    def step(i: int, groups=groups, embed=embed, model=model) -> torch.Tensor:
        for g in groups:
            ids = g[i % 4]
            # Grad on the embeddings' output: backward runs through all layers, no weight gets a grad.
            emb = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
            loss.backward()
        return loss.detach()

    seconds, loss = timed_steps(args, step)
    result = dict(tokens=args.steps * step_tokens(args), seconds=seconds, loss=float(loss), peak_gib=peak_gib(args))
    del model, embed, groups, by_len, step, loss
    free(args)
    return result


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["tiny", "tinyllama", "smollm2"], default=None,
                   help="tiny: the project's 4-layer test model; tinyllama: TinyLlama-1.1B shape, random init; "
                        "smollm2: the real SmolLM2-135M-Instruct (default: tinyllama on cuda, tiny on cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="base weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--jobs", "-K", type=int, default=8, help="K LoRA jobs (default 8)")
    p.add_argument("--micro-batch", "-B", type=int, default=2, help="rows per job per step (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 512 tinyllama, 128 tiny)")
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated row lengths, job k taking the k-th (cycling): a mixed-length workload")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 20 cuda, 8 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 cuda, 2 cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (experimental; compilation "
                   "happens in the warm-up steps, so keep --warmup >= 2)")
    p.add_argument("--peft-autocast", action="store_true",
                   help="run PEFT under torch.autocast(bf16), as HF Trainer(bf16=True) does; by default PEFT "
                        "keeps its fp32 adapters' math in fp32 (get_peft_model's autocast_adapter_dtype)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core box more threads run far slower; "
                        "0 keeps torch's default)")
    p.add_argument("--only", choices=["fused", "peft", "frozen"], action="append",
                   help="run only these measurements (repeatable; for profiling)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    gpu = args.device == "cuda"
    args.shape = args.shape or ("tinyllama" if gpu else "tiny")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.seq_len = args.seq_len or (512 if args.shape == "tinyllama" else 128)
    args.steps = args.steps if args.steps is not None else (20 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    try:
        args.seq_lens = [int(v) for v in args.seq_lens.split(",")] if args.seq_lens else [args.seq_len]
    except ValueError:
        p.error(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}")
    if min(args.jobs, args.micro_batch, args.steps, *args.seq_lens) < 1 or args.warmup < 0:
        p.error("--jobs, --micro-batch, --seq-len(s) and --steps must be >= 1, --warmup >= 0")
    if min(args.seq_lens) < 8 or args.micro_batch * min(args.seq_lens) < 16:
        p.error("rayft's JobConfig needs --seq-len(s) >= 8 and --micro-batch x --seq-len >= 16")
    return args


def device_name(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    # transformers deprecation chatter triggered inside PEFT; not ours to fix, and it buries the table
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/fused_vs_peft.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    lens = ",".join(map(str, args.seq_lens))
    print(f"# {args.shape} shape, {args.dtype}, {args.device} ({device_name(args)}); LoRA r={R} alpha={ALPHA} "
          f"all-linear, AdamW; K={args.jobs} jobs x micro-batch {args.micro_batch} x seq {lens} "
          f"= {step_tokens(args)} tokens per fused step; {args.warmup} warm-up + {args.steps} timed steps"
          f"{'; compiled' if args.compile else ''}", flush=True)

    phases = {"fused": run_fused, "peft": run_peft, "frozen": run_frozen}
    labels = {"fused": "rayft fused (K jobs, one step)", "peft": "PEFT, job by job",
              "frozen": "frozen base, no LoRA (limit)"}
    results: dict = {}
    for name, fn in phases.items():
        if args.only and name not in args.only:
            continue
        r = fn(args)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        results[name] = r
        mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
        print(f"{labels[name]:<32} {r['tokens_per_s']:>10,.0f} tokens/s  ({r['tokens']} tokens in "
              f"{r['seconds']:.2f}s, last loss {r['loss']:.3f}{mem})", flush=True)

    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    ratios = {}
    if "fused" in tps and "peft" in tps:
        ratios["fused_over_peft"] = tps["fused"] / tps["peft"]
    if "fused" in tps and "frozen" in tps:
        ratios["fused_over_frozen"] = tps["fused"] / tps["frozen"]
    for k, v in ratios.items():
        print(f"{k.replace('_over_', ' / '):<32} {v:>10.2f}x")
    if "fused" in results:
        f = results["fused"]
        print(f"{'fused step padding':<32} {f['padding']:>10.1%}  (a rectangular batch: {rectangular_padding(args):.1%}; "
              f"the attention's buckets: {f['attention_padding']:.1%} extra slots)")
        if args.compile:
            print(f"{'graphs compiled in timed steps':<32} {f['recompiles']:>10}")

    def cell(key, fmt):
        v = tps.get(key, ratios.get(key))
        return fmt.format(v) if v is not None else "—"

    date = _dt.date.today().isoformat()
    setup = f"{args.shape} {args.dtype}, K={args.jobs}×B={args.micro_batch}×{lens}" + (", compiled" if args.compile else "")
    padding = f"{results['fused']['padding']:.0%}" if "fused" in results else "—"
    header = ("| date | device | command | setup | rayft fused tok/s | PEFT job-by-job tok/s | frozen base tok/s "
              "| fused/PEFT | fused/frozen | fused padding |")
    row = (f"| {date} | {device_name(args)} | `{command}` | {setup} | {cell('fused', '{:,.0f}')} "
           f"| {cell('peft', '{:,.0f}')} | {cell('frozen', '{:,.0f}')} | {cell('fused_over_peft', '{:.2f}×')} "
           f"| {cell('fused_over_frozen', '{:.2f}×')} | {padding} |")
    print()
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    print(row)

    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "device_name": device_name(args), "command": command, "date": date,
           "results": results, "tokens_per_s": tps, **ratios, "markdown": [header, row]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
