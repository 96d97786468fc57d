"""The memory model of a replica: what a set of jobs will peak at, before they run. Pure Python.

peak = base weights
     + per job: adapter parameters × (weights + grads + optimizer state) bytes
     + activations: tokens × layers × β_token  +  rows × L² × layers × β_attn
     + logits: loss tokens × vocab × β_logit
     + β_0 (workspace: allocator slack, kernels' scratch)

The β are coefficients: `DEFAULT_COEFFICIENTS` come from the usual transformer accounting
(Korthikanti et al. 2022: ~34·hidden bytes per token per layer in 16-bit training), and `fit`
replaces them with least squares over measured peaks (mLoRA fits β0 + β1·B·L + β2·B·L²), reporting
the error so nobody trusts an unfitted model blindly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from rayft.config import ALL_LINEAR
from rayft.targets import select_targets

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# TinyLlama-1.1B's config.json, the shape DESIGN.md's GPU anchors were measured on
TINYLLAMA_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)

LinearShape = tuple[str, int, int]  # (full module name, in features, out features)


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a base model.

    `linears` are the layers an adapter may target (the output head excluded), as the module tree
    has them: `rayft.model.shape.model_shape` reads them from any transformers model built on the
    meta device. `from_hf_config` writes them down for a Llama-family config without torch, for
    the simulator and the benchmarks."""

    hidden: int
    layers: int
    vocab: int
    params: int  # base parameters, tied weights counted once
    linears: tuple[LinearShape, ...]
    dtype_bytes: int = 2
    # modules with weights that no adapter can target (an MoE router, fused experts), by name, and why
    left_out: tuple[tuple[str, str], ...] = ()
    # a quantized base (QLoRA): bytes per weight of its linear layers, quantization constants included
    linear_bytes: float | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, dtype: str = "bfloat16") -> ModelShape:
        """A Llama decoder's shape from its config.json, torch-free (`rayft.model.shape` for any model)."""
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"ModelShape.from_hf_config knows Llama configs only, not model_type {cfg['model_type']!r}: "
                             "read other models with rayft.model.shape.model_shape")
        h, i, layers, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or h // heads
        q, kv = head_dim * heads, head_dim * (cfg.get("num_key_value_heads") or heads)
        per_layer = (("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                     ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i),
                     ("mlp.down_proj", i, h))
        linears = tuple((f"model.layers.{n}.{name}", a, b) for n in range(layers) for name, a, b in per_layer)
        biases = (q + 2 * kv + h if cfg.get("attention_bias") else 0) + (2 * i + h if cfg.get("mlp_bias") else 0)
        embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
        # + two RMSNorm weights per layer and the final norm
        params = sum(a * b for _, a, b in linears) + layers * (2 * h + biases) + embed + h
        return cls(hidden=h, layers=layers, vocab=cfg["vocab_size"], params=params, linears=linears,
                   dtype_bytes=DTYPE_BYTES[dtype])

    @property
    def weight_bytes(self) -> int:
        if self.linear_bytes is None:
            return self.params * self.dtype_bytes
        linear = sum(a * b for _, a, b in self.linears)
        return int((self.params - linear) * self.dtype_bytes + linear * self.linear_bytes)


def quantized_weight_bytes(quantization: str | None, double_quant: bool = False) -> float | None:
    """Bytes per weight of a linear layer held by bitsandbytes: 4 bits (nf4, fp4) with one fp32
    absmax per block of 64 (with double_quant: an 8-bit absmax, and one fp32 per 256 of those), or
    8 bits (int8) with one fp32 scale per row (negligible). None when not quantized."""
    if quantization is None:
        return None
    if quantization == "int8":
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


@dataclass(frozen=True)
class JobShape:
    """What the memory model needs to know of a job."""

    rank: int
    tokens_per_step: int  # tokens in one micro-batch (rows × row length)
    max_seq_len: int
    variant: str = "lora"  # lora | dora | vera
    targets: str | tuple[str, ...] = ALL_LINEAR  # the adapter's target_modules (rayft.targets' rule)
    optimizer_states: int = 2  # AdamW: exp_avg and exp_avg_sq; SGD with momentum: 1
    loss_fraction: float = 1.0  # share of tokens that carry a loss (logits are only made for those)
    micro_batches: int = 1  # per optimizer step (gradient accumulation): a staged step's in-flight units

    @property
    def rows(self) -> int:
        return max(1, self.tokens_per_step // self.max_seq_len)

    def adapter_params(self, model: ModelShape, linears: tuple[LinearShape, ...] | None = None) -> int:
        """Its trainable parameters on `model`, or on those of its `linears` only (a pipeline stage's)."""
        return _adapter_params(self.variant, self.rank, self.targets, model.linears, linears)

    def activation_bytes(self, model: ModelShape, coef: Coefficients, layers: int | None = None) -> int:
        """Activations one micro-batch keeps for the backward, over `layers` decoder layers (all)."""
        layers = model.layers if layers is None else layers
        tokens = self.rows * self.max_seq_len
        return int(tokens * layers * coef.token * model.hidden * model.dtype_bytes
                   + self.rows * self.max_seq_len**2 * layers * coef.attn)

    def logit_bytes(self, model: ModelShape, coef: Coefficients) -> int:
        return int(self.tokens_per_step * self.loss_fraction * model.vocab * coef.logit)


@lru_cache(maxsize=4096)
def _adapter_params(variant: str, rank: int, targets: str | tuple[str, ...], linears: tuple[LinearShape, ...],
                    here: tuple[LinearShape, ...] | None = None) -> int:
    # cached: placement asks for every job's estimate on every replica at every event
    shapes = {name: (n_in, n_out) for name, n_in, n_out in linears}
    kept = None if here is None else {name for name, _, _ in here}
    total = 0
    for name in select_targets(targets, shapes):  # matched on the whole model, as the injection does
        if kept is not None and name not in kept:
            continue
        n_in, n_out = shapes[name]
        if variant == "vera":
            total += rank + n_out  # lambda_d and lambda_b; the shared projections are frozen
        else:
            total += rank * (n_in + n_out) + (n_out if variant == "dora" else 0)
    return total


@dataclass(frozen=True)
class Coefficients:
    token: float  # β_token: activation bytes per token per layer, in units of hidden × dtype bytes
    attn: float  # β_attn: bytes per row per L² per layer (0 with a fused attention kernel)
    logit: float  # β_logit: bytes per loss token per vocab entry
    workspace: float  # β_0, bytes
    fitted_error: float | None = None  # max relative error on the samples it was fitted to


# 34·h bytes per token per layer in 16-bit (17 × hidden × 2 bytes); fp32 logits + their grad (8);
# packed rows carry a bool [L, L] mask (1 byte per layer-independent entry, counted once per layer
# here as a safe over-estimate); 1 GiB of allocator slack.
DEFAULT_COEFFICIENTS = Coefficients(token=17.0, attn=1.0, logit=8.0, workspace=1.0 * GIB)


@dataclass
class Estimate:
    base: int
    adapters: dict[str, int] = field(default_factory=dict)  # per job: weights + grads + optimizer
    activations: int = 0
    logits: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return self.base + sum(self.adapters.values()) + self.activations + self.logits + self.workspace


def adapter_bytes(job: JobShape, model: ModelShape, linears: tuple[LinearShape, ...] | None = None) -> int:
    # fp32 master weights and grads (4 + 4), optimizer state 4 bytes each
    return job.adapter_params(model, linears) * (8 + 4 * job.optimizer_states)


def estimate(model: ModelShape, jobs: dict[str, JobShape], coef: Coefficients = DEFAULT_COEFFICIENTS) -> Estimate:
    """The peak of one fused step of these jobs on one replica."""
    est = Estimate(base=model.weight_bytes, workspace=int(coef.workspace))
    if not jobs:
        return est
    # each job's own rows (the fused step is one padding-free stream; a neighbour's length costs nothing)
    for name, job in jobs.items():
        est.adapters[name] = adapter_bytes(job, model)
        est.activations += job.activation_bytes(model, coef)
        est.logits += job.logit_bytes(model, coef)
    return est


def load_coefficients(path: str | Path) -> Coefficients:
    """Coefficients fitted by benchmarks/memory_model.py (its --json output)."""
    try:
        data = json.loads(Path(path).read_text())
        c = data["coefficients"]
        return Coefficients(token=float(c["token"]), attn=float(c["attn"]), logit=float(c["logit"]),
                            workspace=float(c["workspace"]), fitted_error=c.get("fitted_error"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a memory-model fit (benchmarks/memory_model.py --json): {e}") from e


def fit(samples: list[tuple[ModelShape, dict[str, JobShape], int]]) -> Coefficients:
    """Least-squares coefficients from measured peaks [(model, jobs, peak bytes)], with their error.

    The estimate is linear in (token, attn, logit, workspace) once the known terms (base weights,
    adapters) are subtracted, so ordinary least squares over the samples fits it exactly."""
    if len(samples) < 4:
        raise ValueError(f"fit needs at least 4 measured peaks (one per coefficient), got {len(samples)}")
    unit = Coefficients(token=1.0, attn=1.0, logit=1.0, workspace=1.0)
    rows, targets = [], []
    for model, jobs, peak in samples:
        known = model.weight_bytes + sum(adapter_bytes(j, model) for j in jobs.values())
        parts = []
        for term in ("token", "attn", "logit"):
            only = replace(unit, **{k: 0.0 for k in ("token", "attn", "logit") if k != term}, workspace=0.0)
            e = estimate(model, jobs, only)
            parts.append(e.activations + e.logits)
        rows.append(parts + [1.0])
        targets.append(peak - known)
    beta = _least_squares(rows, targets)
    coef = Coefficients(token=beta[0], attn=beta[1], logit=beta[2], workspace=beta[3])
    err = max(abs(estimate(m, j, coef).total - p) / p for m, j, p in samples)
    return replace(coef, fitted_error=err)


def _least_squares(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve min |a x - b| by the normal equations (4 unknowns: no numpy needed)."""
    n = len(a[0])
    ata = [[sum(r[i] * r[j] for r in a) for j in range(n)] for i in range(n)]
    atb = [sum(r[i] * y for r, y in zip(a, b)) for i in range(n)]
    # scale columns so terms of 1e9 and 1 sit in one well-conditioned system
    s = [math.sqrt(ata[i][i]) or 1.0 for i in range(n)]
    m = [[ata[i][j] / (s[i] * s[j]) for j in range(n)] + [atb[i] / s[i]] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-12:
            raise ValueError("the measured peaks do not determine every coefficient (vary tokens, rows and lengths)")
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] / s[i] for i in range(n)]
