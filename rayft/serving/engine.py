"""Batched generation over many adapters at once: one forward per token for every request.

Requests for different adapters (and for the base model) share each forward: their rows are
ordered by adapter, and the multi-adapter layer applies each adapter to its own rows (the same
routing training uses). Prompts are left-padded; a KV cache makes each later step one token per
row. Per request: max_tokens, temperature, top_p, stop strings and seed; text comes back as deltas
while it is generated (for streaming).

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
        self.lock = threading.Lock()  # one batch at a time; loads and unloads between batches
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.eval()

    # ---- adapters -------------------------------------------------------------------------------

    def load(self, name: str, path: Path) -> float:
        """Load an adapter (PEFT format) under `name`, evicting the least recently used ones beyond
        the maximum; returns the seconds it took. Reloading a loaded name replaces it."""
        t0 = time.perf_counter()
        with self.lock:
            self._load(name, path, keep=set())
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
        """Generate for every request in one batch. on_delta(i, text, finish_reason, tokens) is
        called as request i's text grows, and once more with its finish reason when it ends
        (`tokens`: how many it has generated so far).

        Adapters the batch needs that are not loaded are loaded from `paths` first (evicting only
        adapters this batch does not use). A request whose adapter cannot be loaded gets
        on_error(i, error) and None as its output, the others run; without on_error it raises."""
        if not requests:
            return []
        with self.lock:
            needed = {r.adapter for r in requests if r.adapter is not None}
            for name in needed & set(self.loaded):
                self.touch(name)
            failed: dict[str, Exception] = {}
            for name in sorted(needed - set(self.loaded)):
                try:
                    if not paths or name not in paths:
                        raise AdapterLoadError(f"adapter {name!r} is not loaded")
                    self._load(name, paths[name], keep=needed)
                except AdapterLoadError as e:
                    if on_error is None:
                        raise
                    failed[name] = e
            ok = [i for i, r in enumerate(requests) if r.adapter not in failed]
            for i, r in enumerate(requests):
                if r.adapter in failed:
                    on_error(i, failed[r.adapter])
            emit = on_delta or (lambda i, text, finish, n: None)
            outs = self._generate([requests[i] for i in ok], lambda k, t, f, n: emit(ok[k], t, f, n)) if ok else []
        result: list[GenOutput | None] = [None] * len(requests)
        for k, i in enumerate(ok):
            result[i] = outs[k]
        return result

    def _generate(self, requests, on_delta) -> list[GenOutput]:
        # rows grouped by adapter: the layer applies one adapter per contiguous run of rows
        order = sorted(range(len(requests)), key=lambda i: (requests[i].adapter is not None, requests[i].adapter or ""))
        rows = [requests[i] for i in order]
        segments, start = [], 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k].adapter != rows[start].adapter:
                segments.append(Segment(rows[start].adapter, start, k))
                start = k
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        outs = [GenOutput(prompt_tokens=len(r.prompt_ids)) for r in rows]
        gens = [_generator(r.sampling.seed, self.device) for r in rows]
        eos = self.tokenizer.eos_token_id
        steps = max(r.sampling.max_tokens for r in rows)

        from transformers import DynamicCache

        cache = DynamicCache()
        with self.am.route(segments):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1]
            for step in range(steps):
                greedy = logits.argmax(-1).tolist()  # every row's argmax in one read-back
                nxt = [self.pad_id if outs[k].finish_reason is not None else
                       greedy[k] if rows[k].sampling.temperature == 0 else self._sample(logits[k], rows[k].sampling, gens[k])
                       for k in range(len(rows))]
                for k, tok in enumerate(nxt):
                    if outs[k].finish_reason is None:
                        self._advance(outs[k], rows[k].sampling, tok, eos,
                                      lambda t, f, k=k: on_delta(order[k], t, f, len(outs[k].token_ids)))
                if all(o.finish_reason is not None for o in outs):
                    break
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
                logits = self.model(input_ids=torch.tensor(nxt, device=self.device)[:, None], attention_mask=mask,
                                    position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
        result = [GenOutput()] * len(requests)
        for k, i in enumerate(order):
            result[i] = outs[k]
        return result

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


def _generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g
