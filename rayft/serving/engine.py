"""Batched generation over many adapters at once: one forward per token for every request.

Requests for different adapters (and for the base model) share each forward: their rows are
ordered by adapter, and the multi-adapter layer applies each adapter to its own rows (the same
routing training uses). Prompts are left-padded; a KV cache makes each later step one token per
row. Batching is continuous (`step`): between two tokens, new requests are prefilled and merged
into the running batch and finished ones leave it. Per request: max_tokens, temperature, top_p,
stop strings and seed; text comes back as deltas while it is generated (for streaming).

Adapters load from the store on first use into an LRU of at most `max_adapters`; the least recently
used one is unloaded to make room. Plain PyTorch + rayft.adapters; no Ray.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from rayft.adapters import AdapterModel
from rayft.adapters.peft_format import load_adapter
from rayft.adapters.routing import Segment


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    sampling: Sampling


@dataclass
class GenOutput:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0


class AdapterLoadError(RuntimeError):
    pass


class GenerationEngine:
    def __init__(self, model, tokenizer, max_adapters: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.am = AdapterModel(model)
        self.device = next(model.parameters()).device
        self.max_adapters = max_adapters
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # LRU: least recently used first
        self.lock = threading.Lock()  # one step at a time; loads and unloads between steps
        self.in_use: set[str] = set()  # adapters of the running rows: never evicted or unloaded
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.eval()

    # ---- adapters -------------------------------------------------------------------------------

    def load(self, name: str, path: Path) -> float:
        """Load an adapter (PEFT format) under `name`, evicting the least recently used ones beyond
        the maximum; returns the seconds it took. Reloading a loaded name replaces it."""
        t0 = time.perf_counter()
        with self.lock:
            self._load(name, path, keep=set(self.in_use))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _load(self, name: str, path: Path, keep: set[str]) -> None:
        if name in self.loaded:
            self.am.remove_adapter(name)
            del self.loaded[name]
        while len(self.loaded) >= self.max_adapters:
            old = next((n for n in self.loaded if n not in keep), None)
            if old is None:
                raise AdapterLoadError(f"adapter {name!r}: all {self.max_adapters} adapter slots are in use by this batch")
            del self.loaded[old]
            self.am.remove_adapter(old)
        try:
            load_adapter(self.am, path, name)
        except Exception as e:
            if name in self.am.configs:
                self.am.remove_adapter(name)
            raise AdapterLoadError(f"adapter {name!r} at {path}: {type(e).__name__}: {e}") from e
        self.am.set_trainable(name, False)
        self.loaded[name] = path

    def unload(self, name: str) -> bool:
        with self.lock:
            if name in self.in_use:
                raise AdapterLoadError(f"adapter {name!r} is generating for running requests; unload it after they end")
            if name not in self.loaded:
                return False
            self.am.remove_adapter(name)
            del self.loaded[name]
            return True

    def touch(self, name: str) -> None:
        self.loaded.move_to_end(name)

    # ---- generation -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest],
                 on_delta: Callable[[int, str, str | None, int], None] | None = None,
                 paths: dict[str, Path] | None = None,
                 on_error: Callable[[int, Exception], None] | None = None) -> list[GenOutput | None]:
        """Generate for every request in one batch, to the end. on_delta(i, text, finish_reason,
        tokens) is called as request i's text grows, and once more with its finish reason when it
        ends (`tokens`: how many it has generated so far).

        Adapters the batch needs that are not loaded are loaded from `paths` first (evicting only
        adapters in use by no request). A request whose adapter cannot be loaded gets
        on_error(i, error) and None as its output, the others run; without on_error it raises."""
        emit = on_delta or (lambda i, text, finish, n: None)
        running, admitted = self.step(None, list(enumerate(requests)), emit, paths, on_error)
        while running is not None:
            running, _ = self.step(running, [], emit, paths, on_error)
        return [row.out if row is not None else None for row in admitted]

    @torch.inference_mode()
    def step(self, running: Running | None, new: list[tuple[object, GenRequest]],
             on_delta: Callable[[object, str, str | None, int], None], paths: dict[str, Path] | None = None,
             on_error: Callable[[object, Exception], None] | None = None) -> tuple[Running | None, list]:
        """Continuous batching, one token at a time: admit `new` (key, request) pairs into the
        running batch (their prompts prefilled in one forward of their own, then their KV cache
        merged in), give every row its next token, retire the rows that ended, and run one forward
        for the rest. Returns the batch to pass to the next call (None when no row is left) and the
        new requests' rows (None for one whose adapter failed to load)."""
        with self.lock:
            admitted: list[_Row | None] = []
            if new:
                in_use = set() if running is None else {r.req.adapter for r in running.rows}
                failed = self._ensure_loaded({r.adapter for _, r in new if r.adapter is not None}, in_use, paths, on_error)
                for key, req in new:
                    if req.adapter in failed:
                        on_error(key, failed[req.adapter])
                        admitted.append(None)
                    else:
                        admitted.append(_Row(key, req, GenOutput(prompt_tokens=len(req.prompt_ids)),
                                             _generator(req.sampling.seed, self.device)))
                rows = [r for r in admitted if r is not None]
                if rows:
                    running = self._admit(running, rows)
            if running is None:
                return None, admitted
            self._decode(running, on_delta)
            self.in_use = {r.req.adapter for r in running.rows}
            return (running if running.rows else None), admitted

    def _ensure_loaded(self, needed: set[str], in_use: set[str], paths, on_error) -> dict[str, Exception]:
        for name in needed & set(self.loaded):
            self.touch(name)
        failed: dict[str, Exception] = {}
        for name in sorted(needed - set(self.loaded)):
            try:
                if not paths or name not in paths:
                    raise AdapterLoadError(f"adapter {name!r} is not loaded")
                self._load(name, paths[name], keep=needed | in_use)
            except AdapterLoadError as e:
                if on_error is None:
                    raise
                failed[name] = e
        return failed

    def _admit(self, running: Running | None, rows: list[_Row]) -> Running:
        """Prefill the new rows (left-padded, grouped by adapter) and merge them into the batch."""
        rows = sorted(rows, key=_adapter_key)
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.req.prompt_ids)) + r.req.prompt_ids for r in rows],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.am.route(_segments(rows)):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1]
        fresh = Running(rows, cache, mask, positions[:, -1:], logits)
        if running is None:
            return fresh
        merged = _merge(running, fresh)
        order = sorted(range(len(merged.rows)), key=lambda k: _adapter_key(merged.rows[k]))
        if order != list(range(len(order))):
            merged.select(order)
        return merged

    def _decode(self, running: Running, on_delta) -> None:
        rows, eos = running.rows, self.tokenizer.eos_token_id
        greedy = running.logits.argmax(-1).tolist()  # every row's argmax in one read-back
        nxt = [greedy[k] if r.req.sampling.temperature == 0 else self._sample(running.logits[k], r.req.sampling, r.gen)
               for k, r in enumerate(rows)]
        for r, tok in zip(rows, nxt):
            self._advance(r.out, r.req.sampling, tok, eos,
                          lambda t, f, r=r: on_delta(r.key, t, f, len(r.out.token_ids)))
        keep = [k for k, r in enumerate(rows) if r.out.finish_reason is None]
        if len(keep) < len(rows):
            running.select(keep)
            nxt = [nxt[k] for k in keep]
        if not running.rows:
            return
        running.mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], dim=1)
        running.positions = running.positions + 1
        with self.am.route(_segments(running.rows)):
            running.logits = self.model(
                input_ids=torch.tensor(nxt, device=self.device)[:, None], attention_mask=running.mask,
                position_ids=running.positions, past_key_values=running.cache, use_cache=True).logits[:, -1]
        running.trim()

    @staticmethod
    def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _advance(self, out: GenOutput, s: Sampling, tok: int, eos: int | None, emit) -> None:
        if tok == eos:
            out.finish_reason = "stop"
            emit("", "stop")
            return
        out.token_ids.append(tok)
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        cut = min((text.find(x) for x in s.stop if x and x in text), default=-1)
        if cut >= 0:
            text, out.finish_reason = text[:cut], "stop"
        elif len(out.token_ids) >= s.max_tokens:
            out.finish_reason = "length"
        delta = text[len(out.text):] if text.startswith(out.text) else text
        out.text = text
        if delta:
            emit(delta, None)
        if out.finish_reason is not None:
            emit("", out.finish_reason)


@dataclass
class _Row:
    key: object  # the caller's handle for this request (an index, a queue)
    req: GenRequest
    out: GenOutput
    gen: torch.Generator


@dataclass
class Running:
    """Rows being decoded together: their KV cache, attention mask (left padding is 0), the
    position of each row's last token, and each row's next-token logits. Rows stay grouped by
    adapter, so the multi-adapter layer sees one contiguous run of rows per adapter."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached length]
    positions: torch.Tensor  # [rows, 1]
    logits: torch.Tensor  # [rows, vocab]

    def select(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.mask.device, dtype=torch.long)
        self.rows = [self.rows[k] for k in index]
        self.cache.batch_select_indices(idx)
        self.mask, self.positions, self.logits = self.mask[idx], self.positions[idx], self.logits[idx]

    def trim(self) -> None:
        """Drop leading cache columns that are padding in every row (left by retired long rows)."""
        live = self.mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


def _merge(a: Running, b: Running) -> Running:
    """One batch of two: each left-padded to the longer cache, then stacked."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([pad(la.keys, -2), pad(lb.keys, -2)], dim=0)
        la.values = torch.cat([pad(la.values, -2), pad(lb.values, -2)], dim=0)
    return Running(a.rows + b.rows, a.cache, torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
                   torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits]))


def _adapter_key(row: _Row) -> tuple[bool, str]:
    return (row.req.adapter is not None, row.req.adapter or "")


def _segments(rows: list[_Row]) -> list[Segment]:
    segments, start = [], 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k].req.adapter != rows[start].req.adapter:
            segments.append(Segment(rows[start].req.adapter, start, k))
            start = k
    return segments


def _generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g
