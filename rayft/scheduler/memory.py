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
from pathlib import Path

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# TinyLlama-1.1B's config.json, the shape DESIGN.md's GPU anchors were measured on
TINYLLAMA_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a base model (a Llama-family decoder)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict, dtype: str = "bfloat16") -> ModelShape:
        return cls(
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab=cfg["vocab_size"],
            dtype_bytes=DTYPE_BYTES[dtype],
            tied_embeddings=cfg.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path, dtype: str = "bfloat16") -> ModelShape:
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()), dtype)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of a layer's seven linears."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


@dataclass(frozen=True)
class JobShape:
    """What the memory model needs to know of a job."""

    rank: int
    tokens_per_step: int  # tokens in one micro-batch (rows × row length)
    max_seq_len: int
    variant: str = "lora"  # lora | dora | vera
    targets: tuple[str, ...] = LLAMA_LINEARS  # linear names per layer
    optimizer_states: int = 2  # AdamW: exp_avg and exp_avg_sq; SGD with momentum: 1
    loss_fraction: float = 1.0  # share of tokens that carry a loss (logits are only made for those)

    @property
    def rows(self) -> int:
        return max(1, self.tokens_per_step // self.max_seq_len)

    def adapter_params(self, model: ModelShape) -> int:
        shapes = model.linear_shapes()
        per_layer = 0
        for t in self.targets:
            n_in, n_out = shapes[t]
            if self.variant == "vera":
                per_layer += self.rank + n_out
            else:
                per_layer += self.rank * (n_in + n_out) + (n_out if self.variant == "dora" else 0)
        return per_layer * model.layers


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


def adapter_bytes(job: JobShape, model: ModelShape) -> int:
    # fp32 master weights and grads (4 + 4), optimizer state 4 bytes each
    return job.adapter_params(model) * (8 + 4 * job.optimizer_states)


def estimate(model: ModelShape, jobs: dict[str, JobShape], coef: Coefficients = DEFAULT_COEFFICIENTS) -> Estimate:
    """The peak of one fused step of these jobs on one replica."""
    est = Estimate(base=model.weight_bytes, workspace=int(coef.workspace))
    if not jobs:
        return est
    row_len = max(j.max_seq_len for j in jobs.values())  # rows are padded to the longest in a step
    for name, job in jobs.items():
        est.adapters[name] = adapter_bytes(job, model)
        tokens = job.rows * row_len
        est.activations += int(
            tokens * model.layers * coef.token * model.hidden * model.dtype_bytes
            + job.rows * row_len**2 * model.layers * coef.attn
        )
        est.logits += int(job.tokens_per_step * job.loss_fraction * model.vocab * coef.logit)
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
