"""Batched generation over many adapters at once: one forward per token for every request.

Requests for different adapters (and for the base model) share each forward: their rows are
ordered by adapter, and the multi-adapter layer applies each adapter to its own rows (the same
routing training uses). Prompts are left-padded; a KV cache makes each later step one token per
row. Batching is continuous (`step`): between two tokens, new requests are prefilled and merged
into the running batch and finished ones leave it. Per request: max_tokens, temperature, top_p,
stop strings and seed; text comes back as deltas while it is generated (for streaming), detokenised
incrementally with any possible start of a stop string held back (`rayft.serving.textstream`).
A step reads back from the device once: every row's argmax, whether its logits are finite, and its
sampled token (all sampled rows are drawn together, each at its own seeded uniform).

A request that breaks (non-finite logits, a seed or sampling setting that cannot be used, a failing
callback) ends alone, with its own error: the other rows of the batch go on.

Adapters are loaded by version: a version is one adapter name's files as they are on disk (a path,
and the identity of the files in it, so a rewrite in place is a new version). A row keeps the version
it was admitted with; a new version loads beside the old one, new requests get it once it has loaded,
and the old one is dropped when its last row ends. At most `max_adapters` versions are loaded (an
LRU: the least recently used version no row uses makes room).

A compressed store (`rayft compress`: many adapters in one basis) loads as one version that takes
one slot: its basis and every adapter's loadings go to the device once, and each of its adapters is
served by its own name, any number of them in one batch. Plain PyTorch + rayft.adapters; no Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from rayft import layout
from rayft.adapters import AdapterModel
from rayft.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from rayft.adapters.routing import Segment
from rayft.serving.store import STORE_FILES, file_identity
from rayft.serving.textstream import TextStream

log = logging.getLogger(__name__)

SEED_RANGE = 2**64  # seeds are used as given in [0, 2**64); others are hashed into it
FAILED_LOADS_KEPT = 64  # adapter files that failed to load, remembered so they are not read again


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


class NoFreeSlot(AdapterLoadError):
    """Every adapter slot holds a version running requests use."""


class AdapterInUseError(AdapterLoadError):
    """An adapter cannot be unloaded: running requests generate with it."""


class RowError(RuntimeError):
    """One request's generation broke (its logits are not finite, ...): it alone ends."""


@dataclass(frozen=True, eq=False)
class AdapterVersion:
    """One loaded copy of an adapter (`name` as requests give it), or of a compressed store (`name`:
    the store's; `members`: its adapters, by the names requests give them, and their indices);
    `slot` as the AdapterModel holds it."""

    name: str
    path: Path
    files: tuple  # identity of the files (inode, mtime, size): rewritten in place, they are a new version
    serial: int  # load order
    members: dict[str, int] = field(default_factory=dict)

    @property
    def slot(self) -> str:
        return f"v{self.serial}"

    @property
    def key(self) -> tuple:
        return _version_key(self.name, self.path, self.files, bool(self.members))


def _version_key(name: str, path: Path, files: tuple, store: bool) -> tuple:
    """A store's version is its files' alone: every adapter in it shares one."""
    return (None if store else name, path, files)


def is_compressed_store(path: Path) -> bool:
    return (Path(path) / layout.SUBSPACE_META).is_file()


class GenerationEngine:
    def __init__(self, model, tokenizer, max_adapters: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.am = AdapterModel(model)
        self.device = next(model.parameters()).device
        self.max_adapters = max_adapters
        self.versions: OrderedDict[tuple, AdapterVersion] = OrderedDict()  # LRU: least recently used first
        self.current: dict[str, AdapterVersion] = {}  # the version new requests for a name get
        self.pinned: set[AdapterVersion] = set()  # versions of the running rows: never dropped
        self.in_use: set[str] = set()  # the adapter names the running rows generate with
        self._serials = itertools.count()
        # files that failed to load, by version key: requests for them fail at once, without reading
        # them again inside the step every running request waits for; rewritten, they are tried again
        self._failed_loads: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()  # one step at a time; loads and unloads between steps
        self._cancel_lock = threading.RLock()  # apart from `lock`: cancel() must not wait for a forward
        self._keys: set = set()  # keys of the rows this engine holds
        self._cancelled: set = set()
        self.running_rows = 0  # rows in the batch after the last step
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.eval()

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def loaded(self) -> OrderedDict[str, Path]:
        """Adapter names with a current version loaded, least recently used first, and their paths.
        Safe to read from another thread while a step runs (each snapshot is taken in one C call)."""
        order = {id(v): k for k, v in enumerate(tuple(self.versions.values()))}
        current = sorted((order[id(v)], name, v.path) for name, v in dict(self.current).items() if id(v) in order)
        return OrderedDict((name, path) for _, name, path in current)

    def load(self, name: str, path: Path) -> float:
        """Load the adapter at `path` (PEFT format, or a compressed store that holds one called
        `name`) as the current version of `name`, beside any version running requests still use;
        returns the seconds it took. If it fails, nothing changes: the version that was current
        stays current."""
        t0 = time.perf_counter()
        with self.lock:
            self._version(name, Path(path), keep=set(self.pinned))
            self._drop_stale()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def load_store(self, name: str, path: Path) -> tuple[list[str], float]:
        """Load the compressed store at `path` (called `name`), every adapter in it current under its
        own name; returns those names and the seconds it took."""
        if not is_compressed_store(path):
            raise AdapterLoadError(f"compressed store {name!r}: no {layout.SUBSPACE_META} at {path}")
        t0 = time.perf_counter()
        with self.lock:
            version = self._version(None, Path(path), keep=set(self.pinned), store_name=name)
            self.current.update(dict.fromkeys(version.members, version))
            self._drop_stale()
        return list(version.members), time.perf_counter() - t0

    def unload(self, name: str) -> bool:
        """Unload `name`: every version of an adapter, or a compressed store with all its adapters
        (one adapter of a store stops being served; the store stays while others are); False if
        nothing was loaded. Refused (AdapterInUseError, nothing changed) while running requests
        generate with it."""
        with self.lock:
            stores = [v for v in self.versions.values() if v.members and v.name == name]
            names = {name} | {n for v in stores for n in v.members}
            busy = sorted(names & self.in_use)
            if busy:
                raise AdapterInUseError(f"adapter {busy[0]!r} is generating for running requests; unload "
                                        f"{name!r} after they end")
            mapped = [n for n in names if n in self.current and (n == name or self.current[n] in stores)]
            for n in mapped:
                del self.current[n]
            gone = self._drop(lambda v: (v.name == name and not v.members) or v in stores)
            self._drop_stale()
            return bool(mapped or gone)

    def _version(self, name: str | None, path: Path, keep: set[AdapterVersion],
                 store_name: str | None = None) -> AdapterVersion:
        """The version of `name` at `path` (an adapter, or a compressed store holding one called
        `name`) as its files are now, loaded if it is not; it becomes the current one for `name`.
        `keep`: versions that must not be evicted to make room."""
        store = is_compressed_store(path)
        key = _version_key(name, path, _file_identity(path, store), store)
        version = self.versions.get(key)
        if version is None:
            if key in self._failed_loads:
                raise AdapterLoadError(self._failed_loads[key])
            try:
                version = self._load_version(name, path, key, keep, store_name if store else None)
            except NoFreeSlot:
                raise
            except AdapterLoadError as e:
                self._failed_loads[key] = str(e)
                while len(self._failed_loads) > FAILED_LOADS_KEPT:
                    self._failed_loads.popitem(last=False)
                raise
        if name is not None and version.members and name not in version.members:
            raise AdapterLoadError(f"adapter {name!r} is not in the compressed store at {path} "
                                   f"(it holds {_listed(version.members)})")
        self.versions.move_to_end(key)
        if name is not None:
            self.current[name] = version
        return version

    def _load_version(self, name: str | None, path: Path, key: tuple, keep: set[AdapterVersion],
                      store_name: str | None) -> AdapterVersion:
        """Load an adapter's files, or (`key` without a name) a compressed store's."""
        what = f"adapter {name!r}" if key[0] is not None else f"compressed store {store_name or path.name!r}"
        if len(self.versions) >= self.max_adapters and all(v in keep for v in self.versions.values()):
            raise NoFreeSlot(f"{what}: all {self.max_adapters} adapter slots are in use by this batch")
        serial = next(self._serials)
        slot, members = f"v{serial}", {}
        try:
            if key[0] is None:
                from rayft.adapters.compress import load_subspace

                members = {m: k for k, m in enumerate(self.am.add_subspace(slot, load_subspace(path)))}
            else:
                load_adapter(self.am, path, slot)
                self.am.set_trainable(slot, False)
        except Exception as e:
            if slot in self.am.configs or slot in self.am.subspaces:
                self.am.remove_adapter(slot)
            # the slot is the engine's own name for the version: messages name the adapter
            message = str(e).replace(repr(slot), repr(name) if name is not None else "the store")
            raise AdapterLoadError(f"{what} at {path}: {type(e).__name__}: {message}") from e
        version = AdapterVersion((store_name or path.name) if members else name, path, key[2], serial, members)
        self.versions[key] = version
        keep = keep | {version}
        while len(self.versions) > self.max_adapters:  # the least recently used version no row needs
            if not self._drop(lambda v: v not in keep, limit=1):
                break
        return version

    def _drop(self, which: Callable[[AdapterVersion], bool], limit: int | None = None) -> int:
        """Unload loaded versions for which `which` holds (LRU order, at most `limit`); how many."""
        gone = [k for k, v in self.versions.items() if which(v)][:limit]
        for k in gone:
            version = self.versions.pop(k)
            self.am.remove_adapter(version.slot)
            for name in [n for n, v in self.current.items() if v is version]:
                del self.current[name]
        return len(gone)

    def _drop_stale(self) -> None:
        """Versions current for no name (replaced by a newer one, unloaded) are dropped once no row uses them."""
        current = set(self.current.values())
        self._drop(lambda v: v not in current and v not in self.pinned)

    # ---- cancellation -----------------------------------------------------------------------------

    def cancel(self, key) -> None:
        """End the request with this key, from any thread: no callback for it follows, and its row
        leaves the batch before the next forward (a key about to be admitted is not admitted). A key
        the engine does not hold by the end of the next step is forgotten."""
        with self._cancel_lock:
            self._cancelled.add(key)

    def _is_cancelled(self, key) -> bool:
        with self._cancel_lock:
            return key in self._cancelled

    def _hold(self, keys: list) -> set:
        """Take new rows' keys; returns those cancelled already (they are not admitted)."""
        with self._cancel_lock:
            cancelled = {k for k in keys if k in self._cancelled}
            self._keys.update(k for k in keys if k not in cancelled)
            return cancelled

    def _release(self, keys) -> None:
        with self._cancel_lock:
            self._keys.difference_update(keys)
            self._cancelled.difference_update(keys)

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
        adapters in use by no request). A request that fails (its adapter cannot be loaded, its row
        breaks) gets on_error(i, error) and None as its output, the others run to the end; without
        on_error, the first such error is raised once the others have ended."""
        emit = on_delta or (lambda i, text, finish, n: None)
        errors: dict[int, Exception] = {}
        fail = on_error or errors.__setitem__
        running, admitted = self.step(None, list(enumerate(requests)), emit, paths, fail)
        while running is not None:
            running, _ = self.step(running, [], emit, paths, fail)
        if on_error is None and errors:
            raise errors[min(errors)]
        return [row.out if row is not None and not row.failed else None for row in admitted]

    @torch.inference_mode()
    def step(self, running: Running | None, new: list[tuple[object, GenRequest]],
             on_delta: Callable[[object, str, str | None, int], None], paths: dict[str, Path] | None = None,
             on_error: Callable[[object, Exception], None] | None = None) -> tuple[Running | None, list]:
        """Continuous batching, one token at a time: admit `new` (key, request) pairs into the
        running batch (their prompts prefilled in one forward of their own, then their KV cache
        merged in), give every row its next token, retire the rows that ended, and run one forward
        for the rest. Returns the batch to pass to the next call (None when no row is left) and the
        new requests' rows (None for one that was not admitted: cancelled, or its adapter failed).

        A request that fails gets on_error(key, error) once and no callback after it; without
        on_error, the step raises its error after the others' tokens. If the forward itself raises,
        the whole batch is lost: the error propagates and the engine forgets its rows."""
        failures: list[Exception] = []

        def fail(key, error: Exception) -> None:
            with self._cancel_lock:  # a cancelled request gets no callback, not even its error
                if key not in self._cancelled:
                    if on_error is None:
                        failures.append(error)
                    else:
                        try:
                            on_error(key, error)
                        except Exception:
                            log.exception("on_error failed for a request")
                self._release([key])

        with self.lock:
            try:
                running, admitted = self._step(running, new, on_delta, paths, fail)
            except BaseException:
                self._forget(running, new)
                raise
        if failures:
            raise failures[0]
        return running, admitted

    def _step(self, running, new, on_delta, paths, fail):
        admitted: list[_Row | None] = []
        if new:
            cancelled = self._hold([key for key, _ in new])
            rows = self._rows([(k, r) for k, r in new if k not in cancelled], paths, fail)
            admitted = [None if key in cancelled else rows.pop(0) for key, _ in new]
            fresh = self._prefill([r for r in admitted if r is not None], fail)
            if fresh is not None:
                running = fresh if running is None else _merge(running, fresh)
        if running is not None:
            self._decode(running, on_delta, fail)
        if running is not None and not running.rows:
            running = None
        rows = [] if running is None else [r for r in running.rows if r.version is not None]
        self.pinned, self.in_use = {r.version for r in rows}, {r.req.adapter for r in rows}
        self.running_rows = 0 if running is None else len(running.rows)
        self._drop_stale()
        with self._cancel_lock:  # marks for keys no row holds (ended or never admitted) go
            self._cancelled &= self._keys
        return running, admitted

    def _forget(self, running: Running | None, new) -> None:
        """After a forward failed: the batch is gone; its rows' keys and versions with it."""
        self._release([key for key, _ in new] + ([r.key for r in running.rows] if running is not None else []))
        self.pinned, self.in_use, self.running_rows = set(), set(), 0
        self._drop_stale()

    def _rows(self, new, paths, fail) -> list[_Row | None]:
        """Rows for new requests, each with its adapter version (loaded if needed) and its sampling
        generator; None for a request that cannot start (it gets its error)."""
        keep = set(self.pinned)
        resolved: dict[str, AdapterVersion | Exception] = {}
        rows: list[_Row | None] = []
        for key, req in new:
            try:
                version = None
                if req.adapter is not None:
                    if req.adapter not in resolved:
                        resolved[req.adapter] = self._resolve(req.adapter, paths, keep)
                    version = resolved[req.adapter]
                    if isinstance(version, Exception):
                        raise version
                    keep.add(version)
                rng = random.Random(seed_of(req.sampling.seed))
                stream = TextStream(self._decode_text, req.sampling.stop)
                member = version.members.get(req.adapter) if version is not None else None
                rows.append(_Row(key, req, version, GenOutput(prompt_tokens=len(req.prompt_ids)), rng, stream, member))
            except Exception as e:
                fail(key, e)
                rows.append(None)
        return rows

    def _resolve(self, name: str, paths, keep: set[AdapterVersion]) -> AdapterVersion | Exception:
        """The version a new request for `name` gets: the one at `paths[name]` as its files are now
        (loaded beside the others if new), else the current one; the current one too while no slot
        is free for the new one (it loads when one is)."""
        try:
            if paths and name in paths:
                try:
                    return self._version(name, Path(paths[name]), keep)
                except NoFreeSlot:
                    if name not in self.current:
                        raise
            if name in self.current:
                version = self.current[name]
                self.versions.move_to_end(version.key)
                return version
            raise AdapterLoadError(f"adapter {name!r} is not loaded")
        except AdapterLoadError as e:
            return e

    def _prefill(self, rows: list[_Row | None], fail) -> Running | None:
        """Prefill new rows (left-padded, grouped by adapter) in one forward; if that forward raises,
        each row alone, so that only a row that cannot be prefilled fails."""
        rows = sorted((r for r in rows if r is not None), key=_row_order)
        if not rows:
            return None
        try:
            return self._prefill_forward(rows)
        except Exception as e:
            if len(rows) == 1:
                rows[0].failed = True
                fail(rows[0].key, e)
                return None
        fresh = None
        for row in rows:
            one = self._prefill([row], fail)
            if one is not None:
                fresh = one if fresh is None else _merge(fresh, one)
        return fresh

    def _prefill_forward(self, rows: list[_Row]) -> Running:
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.req.prompt_ids)) + r.req.prompt_ids for r in rows],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        sampling = torch.tensor([[r.req.sampling.temperature, r.req.sampling.top_p] for r in rows],
                                dtype=torch.float32, device=self.device)
        uniforms = self._uniforms(rows)
        cache = DynamicCache()
        with self.am.route(_segments(rows)):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1]
        return Running(rows, cache, mask, positions[:, -1:], logits, sampling, uniforms)

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor:
        """Each row's uniform draw for its next sampled token, from its own seeded generator (a
        greedy row draws none), so a row's samples never depend on the batch it is in. Made before
        the forward whose logits they sample, when the device waits for the host anyway."""
        return torch.tensor([r.rng.random() if r.req.sampling.temperature > 0 else 0.0 for r in rows],
                            dtype=torch.float32, device=self.device)

    def _decode(self, running: Running, on_delta, fail) -> None:
        """Every row's next token from its logits, its text, its end; then one forward for the rest."""
        rows, eos = running.rows, self.tokenizer.eos_token_id
        # one read-back for the batch: every row's argmax, whether its logits are all finite, and a
        # sampled token for every row when some row samples
        logits = running.logits
        picks = [logits.argmax(-1), torch.isfinite(logits).all(-1).long()]
        sampled = [r.req.sampling for r in rows if r.req.sampling.temperature > 0]
        if sampled:
            picks.append(sample_tokens(logits, running.sampling[:, 0], running.sampling[:, 1], running.uniforms,
                                       nucleus=any(s.top_p < 1.0 for s in sampled)))
        greedy, finite, *drawn = torch.stack(picks).tolist()
        nxt: list[int | None] = [None] * len(rows)
        for k, row in enumerate(rows):
            if self._is_cancelled(row.key):
                row.failed = True  # ends silently: its client is gone
                continue
            try:
                if not finite[k]:
                    adapter = f"adapter {row.req.adapter!r}" if row.version is not None else "the base model"
                    raise RowError(f"the logits of this request ({adapter}) are not finite "
                                   f"(NaN or infinity) after {len(row.out.token_ids)} tokens")
                s = row.req.sampling
                nxt[k] = greedy[k] if s.temperature <= 0 else drawn[0][k]
                self._advance(row, nxt[k], eos, on_delta)
            except Exception as e:
                row.failed = True
                fail(row.key, e)
        keep = [k for k, r in enumerate(rows) if r.out.finish_reason is None and not r.failed]
        self._release([r.key for r in rows if r.out.finish_reason is not None or r.failed])
        if len(keep) < len(rows):
            running.select(keep)
            nxt = [nxt[k] for k in keep]
        if not running.rows:
            return
        running.mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], dim=1)
        running.positions = running.positions + 1
        running.uniforms = self._uniforms(running.rows)
        with self.am.route(_segments(running.rows)):
            running.logits = self.model(
                input_ids=torch.tensor(nxt, device=self.device)[:, None], attention_mask=running.mask,
                position_ids=running.positions, past_key_values=running.cache, use_cache=True).logits[:, -1]
        running.trim()

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, row: _Row, tok: int, eos: int | None, on_delta) -> None:
        """Add one token to a row's output; send its new text, then its finish once."""
        out, s = row.out, row.req.sampling
        if tok == eos:
            delta, _ = row.text.close()
            finish = "stop"
        else:
            out.token_ids.append(tok)
            delta, stopped = row.text.push(tok)
            finish = "stop" if stopped else None
            if finish is None and len(out.token_ids) >= s.max_tokens:
                more, stopped = row.text.close()
                delta, finish = delta + more, "stop" if stopped else "length"
        out.text += delta
        out.finish_reason = finish
        if delta:
            self._emit(on_delta, row, delta, None)
        if finish is not None:
            self._emit(on_delta, row, "", finish)

    def _emit(self, on_delta, row: _Row, text: str, finish: str | None) -> None:
        with self._cancel_lock:  # a cancel() that has returned sees no callback after it
            if row.key not in self._cancelled:
                on_delta(row.key, text, finish, len(row.out.token_ids))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                  nucleus: bool = True) -> torch.Tensor:
    """One token per row, all rows at once on the device (no read-back of its own): the inverse of
    the CDF of softmax(logits / temperature) at the row's uniform draw in [0, 1); for a row with
    top_p < 1, of the top_p nucleus, in order of probability. A row's token depends on its own row
    only. `nucleus=False` (no row has top_p < 1) skips the sort."""
    logits = logits.float()
    # shifted so that each row's largest logit is 0: divided by a temperature > 0 nothing overflows
    # to +inf (which makes NaN probabilities), and a tiny temperature leaves the argmax alone: greedy.
    # One below float32's smallest normal acts the same, and must not round to 0 (0 / 0 is NaN).
    t = temperature.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / t, dim=-1)
    pick = _inverse_cdf(probs, uniforms)
    if nucleus:
        ranked, order = probs.sort(-1, descending=True)
        ranked = ranked * ((ranked.cumsum(-1) - ranked) < top_p[:, None])  # the smallest set reaching top_p
        pick = torch.where(top_p < 1.0, order.gather(-1, _inverse_cdf(ranked, uniforms)[:, None]).squeeze(-1), pick)
    return pick


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose CDF passes the row's draw. The draw stays below the total, so
    no token of zero probability at the end is picked; the index is clamped, so a row of NaN (which
    the caller fails) indexes nothing out of range."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


@dataclass(eq=False)
class _Row:
    key: object  # the caller's handle for this request (an index, a queue)
    req: GenRequest
    version: AdapterVersion | None  # None: the base model
    out: GenOutput
    rng: random.Random  # its sampling draws, seeded by its request
    text: TextStream
    member: int | None = None  # its adapter's index in a compressed store's version
    failed: bool = False  # ended by an error or a cancel: not a finished output


@dataclass
class Running:
    """Rows being decoded together: their KV cache, attention mask (left padding is 0), the
    position of each row's last token, and each row's next-token logits. Rows stay grouped by
    adapter version, so the multi-adapter layer sees one contiguous run of rows per version."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached length]
    positions: torch.Tensor  # [rows, 1]
    logits: torch.Tensor  # [rows, vocab]
    sampling: torch.Tensor  # [rows, 2]: temperature, top_p
    uniforms: torch.Tensor  # [rows]: the draw each row samples its next token at

    def select(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.mask.device, dtype=torch.long)
        self.rows = [self.rows[k] for k in index]
        self.cache.batch_select_indices(idx)
        self.mask, self.positions, self.logits = self.mask[idx], self.positions[idx], self.logits[idx]
        self.sampling, self.uniforms = self.sampling[idx], self.uniforms[idx]

    def trim(self) -> None:
        """Drop leading cache columns that are padding in every row (left by retired long rows)."""
        live = self.mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


def _merge(a: Running, b: Running) -> Running:
    """One batch of two: each left-padded to the longer cache, stacked, rows regrouped by version."""
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
    merged = Running(a.rows + b.rows, a.cache, torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
                     torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits]),
                     torch.cat([a.sampling, b.sampling]), torch.cat([a.uniforms, b.uniforms]))
    order = sorted(range(len(merged.rows)), key=lambda k: _row_order(merged.rows[k]))
    if order != list(range(len(order))):
        merged.select(order)
    return merged


def _row_order(row: _Row) -> tuple:
    """Base rows first, then by adapter name and version (and a store's adapter): one contiguous run
    per adapter of each version."""
    v = row.version
    return (False, "", -1, -1) if v is None else (True, v.name, v.serial, -1 if row.member is None else row.member)


def _segments(rows: list[_Row]) -> list[Segment]:
    segments, start = [], 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k].version is not rows[start].version or rows[k].member != rows[start].member:
            v = rows[start].version
            segments.append(Segment(v.slot if v is not None else None, start, k, rows[start].member))
            start = k
    return segments


def _listed(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _file_identity(path: Path, store: bool = False) -> tuple:
    """What tells two versions of an adapter directory (or a compressed store) apart: its files'
    inode, mtime and size."""
    return tuple(file_identity(path / name) for name in (STORE_FILES if store else (CONFIG_FILE, WEIGHTS_FILE)))


def seed_of(seed: int | None) -> int:
    """A request's sampling seed in [0, 2**64): any int works (one outside that range is hashed into
    it, so negative and huge seeds stay distinct), and no seed draws a fresh one from the OS, never
    from or into torch's (or Python's) global generator."""
    if seed is None:
        return secrets.randbits(64)
    if 0 <= seed < SEED_RANGE:
        return seed
    digest = hashlib.sha256(str(int(seed)).encode()).digest()
    return int.from_bytes(digest[:8], "little")

