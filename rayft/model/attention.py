"""Variable-length attention over one packed token stream, for any transformers model.

The fused step feeds the model one `(1, N)` sequence holding many examples (`rayft.data.stream`).
Attention must stay inside each example, and building an `N x N` mask for that would cost memory
and time quadratic in the whole step. Instead an attention function registered with transformers'
`AttentionInterface` gathers the examples into a few buckets of similar length (each bucket a
`(examples, width)` batch, right-padded to its longest example), runs the model's own attention
(sdpa, or the model's eager function with whatever it needs, such as Gemma2's soft-capping) on each
bucket with a causal mask of the bucket's width, and scatters the outputs back to stream order.
Right-padding needs no key mask: a padded slot lies after every real query of its example, so the
causal mask already hides it. Masks are `width x width`, never `N x N`.

The function is switched in only for the packed forward (`packed_attention`); no mask is built by
transformers meanwhile (a registered function without a mask function gets none). Models whose
attention does not go through the interface are caught: the forward must have called it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

NAME = "rayft_packed"


@dataclass
class Bucket:
    examples: int
    width: int
    gather: torch.Tensor  # (examples * width,) stream position of every slot (padding repeats a real one)
    start: int | None = None  # set when the slots are the stream's positions start.. in order: a view, no gather


@dataclass
class AttentionLayout:
    """Where each example's tokens go: buckets for the attention, and `take`, which puts the
    buckets' outputs (concatenated, flattened) back in stream order."""

    buckets: list[Bucket]
    take: torch.Tensor | None  # (N,); None when the buckets' outputs are already in stream order
    lengths: list[int]  # the examples' lengths, in stream order
    base: str = "sdpa"  # the model's own implementation, run on each bucket
    calls: int = field(default=0, compare=False)
    # every bucket's slots, concatenated: what the attention gathers when `take` reorders
    gather: torch.Tensor | None = None
    # each bucket width's mask, made by the first layer and reused by the rest (see _bucket_mask)
    masks: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.gather is None and self.take is not None:
            self.gather = torch.cat([b.gather for b in self.buckets])

    @property
    def padded_slots(self) -> int:
        """Slots the attention computes beyond the real tokens (its only padding)."""
        return sum(b.examples * b.width for b in self.buckets) - sum(self.lengths)

    def to(self, device) -> AttentionLayout:
        buckets = [Bucket(b.examples, b.width, b.gather, b.start) for b in self.buckets]  # on the host: unused there
        return AttentionLayout(buckets, None if self.take is None else self.take.to(device), self.lengths, self.base,
                               gather=None if self.gather is None else self.gather.to(device))


def attention_layout(lengths: list[int], base: str = "sdpa", owners: list[int] | None = None) -> AttentionLayout:
    """Bucket examples of the given lengths (in stream order) by the power of two above their length,
    so no example is padded to more than twice its length and the buckets stay few (log2 of the
    longest). With `owners` (one per example: its job), buckets never mix owners, so an example's
    attention (its bucket's width and batch, hence its float rounding) depends on its own job's
    examples only. Pure: computed on the CPU."""
    owners = owners or [0] * len(lengths)
    if len(owners) != len(lengths):
        raise ValueError(f"{len(owners)} owners for {len(lengths)} examples")
    starts, pos = [], 0
    for n in lengths:
        if n < 1:
            raise ValueError(f"example lengths must be >= 1, got {n}")
        starts.append(pos)
        pos += n
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault((owners[i], (n - 1).bit_length()), []).append(i)
    buckets, order = [], []
    for key in sorted(groups):
        members = groups[key]
        width = max(lengths[i] for i in members)
        t = torch.arange(width)
        gather = torch.cat([starts[i] + t.clamp(max=lengths[i] - 1) for i in members])
        buckets.append(Bucket(len(members), width, gather))
        offset = sum(b.examples * b.width for b in buckets[:-1])
        order += [(offset + e * width + j, starts[i] + j) for e, i in enumerate(members) for j in range(lengths[i])]
    take = torch.empty(pos, dtype=torch.long)
    if order:
        slots, stream = zip(*order)
        take[torch.tensor(stream)] = torch.tensor(slots)
    for b in buckets:  # equal examples laid end to end: the slots are a stretch of the stream
        if torch.equal(b.gather, torch.arange(int(b.gather[0]), int(b.gather[0]) + b.gather.numel())):
            b.start = int(b.gather[0])
    identity = all(b.start is not None for b in buckets) and torch.equal(take, torch.arange(pos))
    return AttentionLayout(buckets, None if identity else take, list(lengths), base)


_active: list[AttentionLayout] = []


def _model_eager(module):
    """The model's own eager attention function, from its modeling file (Gemma2's soft-caps)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _bucket_mask(width: int, window: int | None, base: str, dtype, device) -> torch.Tensor | None:
    """Causal (and sliding-window) mask for one bucket; None where sdpa's own causal flag does it."""
    if base == "sdpa" and (window is None or width <= window):
        return None
    q = torch.arange(width, device=device)[:, None]
    k = torch.arange(width, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    if base == "sdpa":
        return allowed[None, None]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


@torch.compiler.disable  # its buckets change every step: compiled code around it, not through it
def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature: query (1, heads, N, dim), key/value (1, kv_heads, N, dim);
    returns ((1, N, heads, dim), None)."""
    if not _active:
        raise RuntimeError(f"{NAME} attention runs only inside rayft.model.attention.packed_attention")
    layout = _active[-1]
    if query.shape[0] != 1:
        raise RuntimeError(f"{NAME} attention expects one packed sequence, got a batch of {query.shape[0]}")
    layout.calls += 1
    if layout.base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    else:
        attend = _model_eager(module)
    window = kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    # every bucket's slots with one gather (none when the buckets are stretches of the stream in
    # order), then one split: the backward is one scatter, not a zero-filled gradient per bucket
    sizes = [b.examples * b.width for b in layout.buckets]
    split = [_bucketed(t, layout, sizes) for t in (query, key, value)]
    outs = []
    for b, q, k, v in zip(layout.buckets, *split):
        key = (b.width, window, query.dtype)
        if key not in layout.masks:
            layout.masks[key] = _bucket_mask(b.width, window, layout.base, query.dtype, query.device)
        mask = layout.masks[key]
        out, _ = attend(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        outs.append(out.reshape(b.examples * b.width, *out.shape[2:]))
    flat = outs[0] if len(outs) == 1 else torch.cat(outs)
    return (flat if layout.take is None else flat.index_select(0, layout.take))[None], None


def _bucketed(t: torch.Tensor, layout: AttentionLayout, sizes: list[int]) -> list[torch.Tensor]:
    """(1, heads, N, dim) as one (examples, heads, width, dim) tensor per bucket."""
    rows = t.squeeze(0)
    if layout.take is not None:
        rows = rows.index_select(1, layout.gather)
    parts = rows.split(sizes, dim=1) if len(sizes) > 1 else (rows,)
    return [p.view(t.shape[1], b.examples, b.width, t.shape[3]).transpose(0, 1) for p, b in zip(parts, layout.buckets)]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)


def _configs(model: torch.nn.Module) -> list:
    found = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            found[id(cfg)] = cfg
    return list(found.values())


@contextmanager
def packed_attention(model: torch.nn.Module, layout: AttentionLayout):
    """Run the model's forwards inside with attention confined to the layout's examples. Raises if the
    model's attention never called the packed function (it does not use transformers' interface, so
    its attention would have crossed examples)."""
    _register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation_internal = NAME
    _active.append(layout)
    try:
        yield layout
    finally:
        _active.pop()
        for c, impl in zip(configs, before):
            c._attn_implementation_internal = impl
    if layout.calls == 0:
        raise RuntimeError(f"{type(model).__name__}: its attention does not go through transformers' "
                           f"AttentionInterface, so a packed stream cannot be kept apart by example")
