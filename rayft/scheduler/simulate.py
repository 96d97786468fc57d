"""Replay a job trace against rayft's placement and against mLoRA's policy. Pure Python (stdlib).

Trace: JSONL, one job per line (blank lines and lines starting with ``#`` are skipped)::

    {"name": "chat-3", "arrival": 12.5, "rank": 16, "max_seq_len": 1024,
     "seq_lens": [88, 130, 512, ...],          # example lengths, sampled uniformly with replacement
     "tokens": 4000000,                         # real training tokens the job must process
     "priority": 0, "micro_batch_tokens": 4096} # optional (defaults 0 and 4096)

``seq_lens`` is either a list of example lengths (an empirical distribution: repeat a value to
weight it) or an object ``{"min": a, "max": b}`` for lengths uniform on [a, b]. Every length must be
in [1, max_seq_len].

Time model (one H100, TinyLlama-1.1B shape; DESIGN.md, "Measured anchors"): a replica runs fused
steps of all its jobs; a step that processes P tokens (padding included) takes

    max(floor_s, P / peak_tokens_per_s)

with floor_s = 0.07 s (the frozen base's step is flat, launch-bound, from 1 to 8 rows of 512
tokens) and peak_tokens_per_s = 0.85 × 62.7k (the frozen-base limit at large batch times the
target share for the LoRA layers). Both policies get the same time model: the simulator measures
scheduling (padding, concurrency, memory), not kernels — rayft's faster step is not credited.

rayft's policy: at every event (arrival, job completion) the queue is placed with
``packing.place`` (memory model under ``budget_bytes``; priority, then arrival). Each step every job
of a replica contributes one micro-batch of ``min(micro_batch_tokens, tokens left)`` real tokens,
and the fused step runs exactly those (one padding-free token stream of all jobs: processed = real;
fragmentation of examples at row ends is not modelled). Jobs joining a busy replica start at its
next step.

mLoRA's policy (the baseline): first-in-first-out, at most ``concurrency`` jobs per replica, no
memory check. Each step a job draws B = max(1, micro_batch_tokens // max_seq_len) examples from
``seq_lens`` (fewer if its remaining tokens are covered sooner); every example is padded to the
longest one in its job's batch (``pad_scope="job"``: processed = B × max, as issue 3 describes) or in
the whole fused batch (``pad_scope="fused"``: what mLoRA's dispatcher does, ``_align_batch_tokens``
pads all jobs' sequences to one length, rounded to 8). A predicted OOM is counted whenever the
memory model's estimate of a replica's concurrent set exceeds the budget (per-job row length for
``"job"``, the set's longest for ``"fused"``); the simulator then pushes the job admitted last
back to the head of the queue and admits nothing more to that replica until one of its jobs
finishes (mLoRA would have crashed; this is the kindest recovery).

Both: a job that does not fit an empty replica is reported in ``never_fit`` and never queued.
Results are deterministic given ``seed`` (it drives mLoRA's sampling of example lengths).
"""

from __future__ import annotations

import heapq
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from rayft.scheduler.memory import (
    DEFAULT_COEFFICIENTS,
    GIB,
    Coefficients,
    JobShape,
    ModelShape,
    estimate,
)
from rayft.scheduler.packing import ReplicaState, Request, never_fits, place

DEFAULT_BUDGET = int(0.9 * 80 * GIB)
POLICIES = ("rayft", "mlora")


@dataclass(frozen=True)
class Throughput:
    floor_s: float = 0.07  # a step never takes less (kernel-launch bound)
    peak_tokens_per_s: float = 0.85 * 62_700  # processed tokens per second at large batch

    def step_time(self, processed_tokens: int) -> float:
        return max(self.floor_s, processed_tokens / self.peak_tokens_per_s)


@dataclass(frozen=True)
class TraceJob:
    name: str
    arrival: float
    rank: int
    max_seq_len: int
    seq_lens: tuple[int, ...] | tuple[int, int]  # a list of lengths, or (min, max) when seq_range
    tokens: int
    priority: int = 0
    micro_batch_tokens: int = 4096
    seq_range: bool = False  # seq_lens is an inclusive (min, max) range

    def shape(self) -> JobShape:
        return JobShape(rank=self.rank, tokens_per_step=self.micro_batch_tokens, max_seq_len=self.max_seq_len)

    @property
    def rows(self) -> int:
        return self.shape().rows

    def sample_len(self, rng: random.Random) -> int:
        if self.seq_range:
            return rng.randint(self.seq_lens[0], self.seq_lens[1])
        return rng.choice(self.seq_lens)


class TraceError(ValueError):
    pass


def _job_from_dict(d: object) -> TraceJob:
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    known = {"name", "arrival", "rank", "max_seq_len", "seq_lens", "tokens", "priority", "micro_batch_tokens"}
    if unknown := set(d) - known:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    if missing := [k for k in ("name", "arrival", "rank", "max_seq_len", "seq_lens", "tokens") if k not in d]:
        raise ValueError(f"missing field(s) {missing}")

    def integer(key: str, default: int | None = None, minimum: int = 1) -> int:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"'{key}' must be an integer >= {minimum}, got {v!r}")
        return v

    name = d["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"'name' must be a non-empty string, got {name!r}")
    arrival = d["arrival"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or arrival < 0 or not math.isfinite(arrival):
        raise ValueError(f"'arrival' must be a number of seconds >= 0, got {arrival!r}")
    max_len = integer("max_seq_len")
    sl = d["seq_lens"]
    if isinstance(sl, dict):
        if set(sl) != {"min", "max"}:
            raise ValueError(f"'seq_lens' as an object needs exactly 'min' and 'max', got {sorted(sl)}")
        lens, is_range = (sl["min"], sl["max"]), True
        if all(isinstance(x, int) for x in lens) and lens[0] > lens[1]:
            raise ValueError(f"'seq_lens' min {lens[0]} > max {lens[1]}")
    elif isinstance(sl, list) and sl:
        lens, is_range = tuple(sl), False
    else:
        raise ValueError(f"'seq_lens' must be a non-empty list of lengths or {{'min': a, 'max': b}}, got {sl!r}")
    for x in lens:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= max_len:
            raise ValueError(f"'seq_lens' entries must be integers in [1, max_seq_len={max_len}], got {x!r}")
    return TraceJob(name=name, arrival=float(arrival), rank=integer("rank"), max_seq_len=max_len,
                    seq_lens=lens, tokens=integer("tokens"), priority=integer("priority", 0, minimum=-10**9),
                    micro_batch_tokens=integer("micro_batch_tokens", 4096), seq_range=is_range)


def load_trace(path: str | Path) -> list[TraceJob]:
    """Read a JSONL trace; a bad line raises TraceError naming the file, the line and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"{path}: cannot read trace: {e.strerror or e}") from e
    jobs: list[TraceJob] = []
    seen: dict[str, int] = {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = _job_from_dict(json.loads(line))
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{no}: not valid JSON: {e.msg} (column {e.colno})") from e
        except ValueError as e:
            raise TraceError(f"{path}:{no}: {e}") from e
        if job.name in seen:
            raise TraceError(f"{path}:{no}: job name {job.name!r} already used on line {seen[job.name]}")
        seen[job.name] = no
        jobs.append(job)
    if not jobs:
        raise TraceError(f"{path}: the trace has no jobs")
    return jobs


@dataclass
class SimResult:
    policy: str
    replicas: int
    makespan: float  # seconds from the first arrival to the last completion
    utilisation: float  # real tokens / (makespan × replicas × peak rate)
    padding_fraction: float  # padding tokens / processed tokens
    predicted_ooms: int
    mean_jct: float  # mean of (completion - arrival) over completed jobs, seconds
    real_tokens: int
    processed_tokens: int
    steps: int
    completion: dict[str, float] = field(default_factory=dict)  # job -> completion time
    never_fit: list[str] = field(default_factory=list)
    max_peak_bytes: int = 0  # the largest estimate of any replica's running set
    max_concurrent: int = 0  # most jobs on one replica at once

    def summary(self) -> str:
        return (f"{self.policy:24s} makespan {self.makespan:9.1f} s  utilisation {self.utilisation:6.1%}  "
                f"padding {self.padding_fraction:6.1%}  predicted OOMs {self.predicted_ooms:3d}  "
                f"mean JCT {self.mean_jct:9.1f} s  max peak {self.max_peak_bytes / GIB:5.1f} GiB  "
                f"max jobs/replica {self.max_concurrent}"
                + (f"  never fit: {', '.join(self.never_fit)}" if self.never_fit else ""))


@dataclass
class _Replica:
    state: ReplicaState
    remaining: dict[str, int] = field(default_factory=dict)  # running jobs -> real tokens left
    step_end: float | None = None
    step_real: dict[str, int] = field(default_factory=dict)  # this step's real tokens per job
    blocked: bool = False  # mLoRA: OOMed, admits nothing until a job finishes


def _mlora_peak(model: ModelShape, jobs: dict[str, JobShape], pad_scope: str, coef: Coefficients) -> int:
    """mLoRA's peak: each job's rows at its own length ("job"), or every row padded to the set's
    longest ("fused": the same rows, each as long as the longest)."""
    if pad_scope == "fused" and len(jobs) > 1:
        longest = max(s.max_seq_len for s in jobs.values())
        jobs = {n: replace(s, tokens_per_step=s.rows * longest, max_seq_len=longest) for n, s in jobs.items()}
    return estimate(model, jobs, coef).total


def simulate(trace: list[TraceJob], policy: str = "rayft", replicas: int = 2, model: ModelShape | None = None,
             budget_bytes: int = DEFAULT_BUDGET, throughput: Throughput = Throughput(), *,
             concurrency: int = 4, pad_scope: str = "job", seed: int = 0,
             coef: Coefficients = DEFAULT_COEFFICIENTS) -> SimResult:
    """Replay ``trace`` on ``replicas`` replicas of ``model`` under ``policy`` ("rayft" or "mlora")."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
    if pad_scope not in ("job", "fused"):
        raise ValueError(f"pad_scope must be 'job' or 'fused', got {pad_scope!r}")
    if replicas < 1 or concurrency < 1:
        raise ValueError("replicas and concurrency must be >= 1")
    if model is None:
        raise ValueError("simulate needs a ModelShape")
    rng = random.Random(seed)
    jobs = {j.name: j for j in trace}
    if len(jobs) != len(trace):
        raise ValueError("job names in a trace must be unique")
    reps = [_Replica(ReplicaState(f"replica-{i}", model, budget_bytes)) for i in range(replicas)]
    arrivals = sorted(trace, key=lambda j: (j.arrival, j.name))
    never_fit = [j.name for j in arrivals
                 if never_fits(Request(j.name, j.shape()), model, [budget_bytes] * replicas, coef)]
    queue: list[TraceJob] = []
    completion: dict[str, float] = {}
    ooms = steps = real_total = processed_total = max_peak = max_conc = 0
    now, ai = 0.0, 0
    first_arrival = arrivals[0].arrival if arrivals else 0.0

    def admit() -> None:
        nonlocal ooms, max_peak
        if policy == "rayft":
            reqs = [Request(j.name, j.shape(), j.priority, j.arrival) for j in queue]
            placed, _ = place(reqs, [r.state for r in reps], coef)
            for name, rname in placed.items():
                next(r for r in reps if r.state.name == rname).remaining[name] = jobs[name].tokens
            queue[:] = [j for j in queue if j.name not in placed]
            for r in reps:
                if r.state.jobs:
                    max_peak = max(max_peak, r.state.peak(coef))
            return
        while queue:  # mLoRA: strict FIFO into the least-loaded open replica
            open_ = [r for r in reps if not r.blocked and len(r.state.jobs) < concurrency]
            if not open_:
                return
            r = min(open_, key=lambda x: len(x.state.jobs))
            job = queue.pop(0)
            r.state.jobs[job.name] = job.shape()
            peak = _mlora_peak(model, r.state.jobs, pad_scope, coef)
            if peak > budget_bytes:
                ooms += 1
                del r.state.jobs[job.name]
                queue.insert(0, job)
                r.blocked = True
                continue
            max_peak = max(max_peak, peak)
            r.remaining[job.name] = job.tokens

    def start_step(r: _Replica) -> None:
        nonlocal steps, real_total, processed_total, max_conc
        if not r.remaining:
            r.step_end = None
            return
        max_conc = max(max_conc, len(r.remaining))
        r.step_real = {}
        processed = 0
        if policy == "rayft":
            for n, left in r.remaining.items():
                real = min(jobs[n].micro_batch_tokens, left)
                r.step_real[n] = real
                processed += real
        else:
            batches = {}
            for n, left in r.remaining.items():
                job, lens = jobs[n], []
                got = 0
                while len(lens) < job.rows and got < left:
                    lens.append(job.sample_len(rng))
                    got += lens[-1]
                batches[n] = lens
                r.step_real[n] = min(got, left)
            if pad_scope == "fused":
                width = math.ceil(max(max(b) for b in batches.values()) / 8) * 8
                processed = width * sum(len(b) for b in batches.values())
            else:
                processed = sum(len(b) * max(b) for b in batches.values())
        steps += 1
        real_total += sum(r.step_real.values())
        processed_total += processed
        r.step_end = now + throughput.step_time(processed)

    def end_step(r: _Replica) -> bool:
        done = False
        for n, real in r.step_real.items():
            r.remaining[n] -= real
            if r.remaining[n] <= 0:
                del r.remaining[n]
                del r.state.jobs[n]
                completion[n] = now
                r.blocked = False
                done = True
        r.step_real = {}
        r.step_end = None
        return done

    # event loop: arrivals and step ends; placement at every event; idle replicas start a step
    heap: list[tuple[float, int]] = []
    while ai < len(arrivals) or queue or any(r.remaining for r in reps):
        t_arr = arrivals[ai].arrival if ai < len(arrivals) else math.inf
        t_step = heap[0][0] if heap else math.inf
        if t_arr == math.inf and t_step == math.inf:
            break  # queued jobs that can never start (cannot happen: never-fit jobs are not queued)
        if t_arr <= t_step:
            now = t_arr
            while ai < len(arrivals) and arrivals[ai].arrival == now:
                if arrivals[ai].name in never_fit:
                    if policy == "mlora":
                        ooms += 1  # it would be admitted and crash; then dropped
                else:
                    queue.append(arrivals[ai])
                ai += 1
            changed = True
        else:
            now, i = heapq.heappop(heap)
            changed = end_step(reps[i])  # a placement event only when a job completed
        if changed:
            admit()
        for i, r in enumerate(reps):
            if r.step_end is None and r.remaining:
                start_step(r)
                heapq.heappush(heap, (r.step_end, i))

    makespan = (max(completion.values()) - first_arrival) if completion else 0.0
    cap = makespan * replicas * throughput.peak_tokens_per_s
    return SimResult(
        policy=policy if policy == "rayft" else f"mlora(C={concurrency}, pad={pad_scope})",
        replicas=replicas, makespan=makespan, utilisation=real_total / cap if cap else 0.0,
        padding_fraction=(processed_total - real_total) / processed_total if processed_total else 0.0,
        predicted_ooms=ooms,
        mean_jct=sum(completion[n] - jobs[n].arrival for n in completion) / len(completion) if completion else 0.0,
        real_tokens=real_total, processed_tokens=processed_total, steps=steps, completion=completion,
        never_fit=never_fit, max_peak_bytes=max_peak, max_concurrent=max_conc)


def compare(trace: list[TraceJob], replicas: int = 2, model: ModelShape | None = None,
            budget_bytes: int = DEFAULT_BUDGET, throughput: Throughput = Throughput(), *,
            concurrency: int = 4, pad_scope: str = "job", seed: int = 0,
            coef: Coefficients = DEFAULT_COEFFICIENTS) -> tuple[SimResult, SimResult]:
    """Both policies on the same trace: (rayft, mlora). Makespan ratio = mlora.makespan / rayft.makespan."""
    kw = dict(replicas=replicas, model=model, budget_bytes=budget_bytes, throughput=throughput,
              concurrency=concurrency, pad_scope=pad_scope, seed=seed, coef=coef)
    return simulate(trace, "rayft", **kw), simulate(trace, "mlora", **kw)
