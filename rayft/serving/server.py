"""The Ray Serve deployment: an OpenAI-compatible FastAPI ingress in front of a GenerationEngine.

Each replica holds one base model and an LRU of adapters. Requests queue; a batcher runs the
engine one token at a time in a worker thread, and between tokens lets queued requests join the
running mixed-adapter batch (continuous batching, up to `max_batch` rows), streaming text back to
each request as it is made. Adapters are found in
the store at request time, so an adapter written there (a training job finishing) is servable at
once, without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import weakref
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from rayft import layout
from rayft.config import BaseModelConfig, ServeConfig
from rayft.serving import openai_api as api
from rayft.serving.engine import (
    AdapterInUseError,
    AdapterLoadError,
    GenerationEngine,
    GenRequest,
    NoFreeSlot,
    Sampling,
    is_compressed_store,
)
from rayft.serving.store import AdapterStore, StoreError, check_name

log = logging.getLogger(__name__)

app = FastAPI(title="rayft", description="OpenAI-compatible multi-adapter inference")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, api.error_body(message, type_, param, code)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return JSONResponse(e.body, status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc holds the character offset, not a field
        why = (first.get("ctx") or {}).get("error", first["msg"])
        return JSONResponse(api.error_body(f"malformed JSON at character {first['loc'][-1]}: {why}",
                                           "invalid_request_error"), status_code=400)
    field = _param(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return JSONResponse(api.error_body(f"{field}: {msg}" if field else f"request body: {msg}",
                                       "invalid_request_error", field), status_code=400)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, e: HTTPException):
    return _http_error_response(e)


def _http_error_response(e: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (no such route, a body that is not UTF-8 or cannot be
    parsed, too large) in OpenAI's shape."""
    message, cause = str(e.detail), e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = f"the request body is not valid UTF-8 (byte {cause.start}: {cause.reason})"
    elif cause is not None and e.status_code == 400:
        message = f"the request body is not valid JSON: {cause}"
    type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
    code = "request_too_large" if e.status_code == 413 else None
    return JSONResponse(api.error_body(message, type_, None, code), status_code=e.status_code, headers=e.headers)


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception):
    log.error("request failed", exc_info=e)
    return JSONResponse(api.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


# the tags pydantic puts in an error's location for a union's members: `str`, `list[str]`, `function-after[...]`
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: tuple) -> str | None:
    """A validation error's location as OpenAI's `param`: `messages.0.content`, not `body.messages.0.content.str`."""
    parts = []
    for x in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(x, int):
            parts.append(str(x))
        elif x.isidentifier() and x not in _TYPE_TAGS:
            parts.append(x)
        else:
            break
    return ".".join(parts) or None


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes (max_body_bytes)")


async def _drain(receive, received: int, limit: int) -> None:
    """Reads and drops the rest of a refused body, up to a bound: a client still sending when the
    answer comes would see its connection reset instead of the answer."""
    while received <= 16 * limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        received += len(message.get("body", b""))


class BodyLimit:
    """ASGI middleware: a request body over `app.state.max_body_bytes` is refused (413) before it is
    parsed: by its Content-Length, else as soon as the bytes received pass the limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", ServeConfig.model_fields["max_body_bytes"].default)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _drain(receive, 0, limit)
            return await _http_error_response(BodyTooLarge(limit))(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                await _drain(receive, received, limit)
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


app.add_middleware(BodyLimit)


class DashboardMount:
    """The rayft dashboard (`rayft.dashboard`) at /dashboard/, when this app serves a cluster's
    storage root (the store holds the job registry); its playground then calls this app itself."""

    def __init__(self):
        self.app = None

    def enable(self) -> None:
        from rayft.dashboard.app import build_app as dashboard_app

        self.app = dashboard_app(hosts=None, same_origin_serve=True)

    async def __call__(self, scope, receive, send):
        if self.app is None:
            missing = HTTPException(404, "no dashboard here: this server's store is not a cluster storage root "
                                         "(it holds no job registry)")
            return await _http_error_response(missing)(scope, receive, send)
        await self.app(scope, receive, send)


dashboard = DashboardMount()
app.mount("/dashboard", dashboard)


def base_model_of(cfg: ServeConfig) -> BaseModelConfig:
    """The configured base model, else the one every adapter in the store names."""
    if cfg.base_model is not None:
        return cfg.base_model
    named = {}
    store = AdapterStore(cfg.store)
    for name, path in store.list().items():
        base = json.loads(store.checked_files(path).config.read_text()).get("base_model_name_or_path")
        if base:
            named.setdefault(base, []).append(name)
    if len(named) != 1:
        raise ValueError(
            f"store {cfg.store}: cannot tell the base model from its adapters "
            f"({'none names one' if not named else 'they name ' + ', '.join(sorted(named))}); set base_model")
    return BaseModelConfig(path=next(iter(named)))


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: its vocabulary's longest token string (a
    byte-level token's string has a character per byte; added tokens such as `<|im_start|>` count)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max([len(t) for t in tokens if t] + [1])


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _api_error_of(e: Exception) -> ApiError:
    if isinstance(e, NoFreeSlot):  # every slot serves running requests: a moment later one is free
        return ApiError(503, str(e), "server_busy_error", "model")
    if isinstance(e, AdapterLoadError):
        return ApiError(500, str(e), "adapter_load_error", "model")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


# (helpers stay above the class: Serve pickles the decorated class with the globals it sees then)
# Requests in flight per replica: what a batch is made of. Far above max_batch, so a burst waits in
# the replica's own queue, which the batcher drains between tokens; past max_ongoing_requests, Serve's
# router holds requests and retries each with backoff (up to 0.5 s) while the replica may sit idle.
# Past max_queued_requests more waiting at a router, a request is refused at once (503), not queued.
MAX_ONGOING_REQUESTS = 2048
MAX_QUEUED_REQUESTS = 2048


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  max_queued_requests=MAX_QUEUED_REQUESTS)
@serve.ingress(app)
class AdapterServer:
    def __init__(self, cfg: dict):
        from rayft.model.load import ensure_model, load_base_model

        self.cfg = ServeConfig.model_validate(cfg)
        base = base_model_of(self.cfg)
        ensure_model(base)
        model, tokenizer = load_base_model(base)
        self.engine = GenerationEngine(model, tokenizer, self.cfg.max_adapters)
        self.store = AdapterStore(self.cfg.store)
        self.base_id = Path(base.path).name or base.path
        self.registered: dict[str, Path] = {}  # POST /v1/adapters: name -> path, over the store's own
        self.registered_stores: dict[str, list[str]] = {}  # a POSTed compressed store's name -> its adapters
        self.store_paths: set[Path] = set()  # paths that are compressed stores: all their adapters take one slot
        self.scratch = Path(tempfile.mkdtemp(prefix="rayft-serve-"))  # merges made at run time
        self.paths: dict[str, Path] = {}  # every adapter requests have named, for the batcher to load
        self.abandoned: weakref.WeakSet = weakref.WeakSet()  # requests whose clients went away
        self.queue: asyncio.Queue | None = None
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.chars_per_token = max_chars_per_token(tokenizer)
        app.state.max_body_bytes = self.cfg.max_body_bytes
        if (self.store.root / layout.REGISTRY).is_file():
            dashboard.enable()

    # ---- routes ---------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict:
        data = [{"id": self.base_id, "object": "model", "owned_by": "rayft", "parent": None, "root": self.base_id}]
        for name, path in sorted({**self.store.list(), **self.registered}.items()):
            if name == self.base_id:  # requests for this name reach the base model
                continue
            data.append({"id": name, "object": "model", "owned_by": "rayft", "parent": self.base_id,
                         "root": str(path), "loaded": name in self.engine.loaded})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(self, req: api.CompletionRequest):
        try:
            prompt = req.prompt_text()
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "prompt") from None
        ids = await self._tokenize("prompt", len(prompt), self.engine.tokenizer.encode, prompt)
        gen = await self._request(req, ids)
        rid = api.new_id("cmpl")
        if req.stream:
            first = await self._first(gen)

            events = self._events(gen, first, lambda text, finish: api.completion_body(rid, req.model, text, finish),
                                  lambda n: api.completion_usage_chunk(rid, req.model, api.usage(len(ids), n))
                                  if req.include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        text, finish, n = await self._collect(gen)
        return api.completion_body(rid, req.model, text, finish, api.usage(len(ids), n))

    @app.post("/v1/chat/completions")
    async def chat(self, req: api.ChatRequest):
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"model {self.base_id} has no chat template; use /v1/completions",
                           "invalid_request_error", "messages")
        messages = [m.model_dump() for m in req.messages]
        ids = await self._tokenize("messages", sum(len(m["content"]) for m in messages), _chat_ids, tok, messages)
        gen = await self._request(req, ids)
        rid = api.new_id("chatcmpl")
        if req.stream:
            first = await self._first(gen)

            events = self._events(
                gen, first, lambda text, finish: api.chat_chunk(rid, req.model, {"content": text} if text else {}, finish),
                lambda n: api.chat_usage_chunk(rid, req.model, api.usage(len(ids), n)) if req.include_usage else None,
                opening=api.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
            return StreamingResponse(events, media_type="text/event-stream")
        text, finish, n = await self._collect(gen)
        return api.chat_body(rid, req.model, text, finish, api.usage(len(ids), n))

    @app.post("/v1/adapters")
    async def load_adapter(self, req: api.LoadAdapterRequest) -> dict:
        """Serve an adapter of the store under a name (or every adapter of a compressed store, each
        under its own), or a merge of served adapters made now."""
        if req.name == self.base_id:  # requests naming it get the base model: the adapter could never be reached
            raise ApiError(400, f"name: {req.name!r} is the base model's id; give the adapter another name",
                           "invalid_request_error", "name")
        if req.merge is not None:
            path = await self._merged(req.name, req.merge)
        else:
            try:
                check_name(req.name)
                path = self.store.inside(req.path)
            except StoreError as e:
                raise ApiError(400, str(e), "invalid_request_error", "path" if "path" in str(e) else "name") from None
            if is_compressed_store(path):
                return await self._load_store(req.name, path)
            if not (path / "adapter_config.json").is_file():
                raise ApiError(404, f"no adapter at {req.path!r} in the store (no adapter_config.json, "
                               "nor a compressed store's subspace.json)", "not_found_error", "path")
        # loaded beside the version running requests use; they keep it, new requests get this one
        seconds = await self._load(req.name, path)
        self.registered[req.name] = self.paths[req.name] = path
        return {"name": req.name, "path": str(path), "load_seconds": seconds}

    async def _load_store(self, name: str, path: Path) -> dict:
        """Every adapter of a compressed store served under its own name, its basis loaded once."""
        adapters = self.store.members(path)
        if self.base_id in adapters:
            raise ApiError(400, f"path: the compressed store holds an adapter named {self.base_id!r}, the base "
                           "model's id, which requests could never reach", "invalid_request_error", "path")
        try:
            members, seconds = await asyncio.get_running_loop().run_in_executor(None, self.engine.load_store,
                                                                                name, path)
        except NoFreeSlot as e:
            raise _api_error_of(e) from None
        except AdapterLoadError as e:
            raise ApiError(400, f"path: {e}", "invalid_request_error", "path") from None
        self.store_paths.add(path)
        for member in self.registered_stores.pop(name, []):  # a store POSTed again: its new list only
            self.registered.pop(member, None)
        self.registered_stores[name] = members
        for member in members:
            self.registered[member] = self.paths[member] = path
        return {"name": name, "path": str(path), "adapters": members, "load_seconds": seconds}

    async def _merged(self, name: str, spec: api.MergeSpec) -> Path:
        """`rayft merge` of served adapters, written under this replica's scratch directory (it
        serves until the server restarts, as any adapter POSTed)."""
        from rayft.adapters.compress import load_subspace
        from rayft.adapters.merge import MergeError, merge, read_lora, save_merge

        known = {**self.store.list(), **self.registered}
        for i, adapter in enumerate(spec.adapters):
            if adapter not in known:
                raise ApiError(404, f"merge.adapters[{i}]: no adapter {adapter!r} is served", "not_found_error",
                               "merge.adapters", "model_not_found")

        def read(adapter: str):  # an adapter's directory, or its compressed store
            path = known[adapter]
            return load_subspace(path).reconstruct(adapter) if is_compressed_store(path) else read_lora(path)

        def build() -> Path:
            result = merge([read(a) for a in spec.adapters], spec.method, spec.weights, spec.density,
                           spec.rank, spec.majority_sign, spec.seed)
            return save_merge(result, self.scratch / "merges" / name)

        try:
            return await asyncio.get_running_loop().run_in_executor(None, build)
        except MergeError as e:
            raise ApiError(400, f"merge: {e}", "invalid_request_error", "merge") from None

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(self, name: str) -> dict:
        """Unload every version of an adapter and forget a POST's registration; refused (409,
        nothing changed) while running requests generate with it."""
        known = name in self.registered or name in self.registered_stores or name in self.engine.loaded
        try:
            unloaded = await asyncio.get_running_loop().run_in_executor(None, self.engine.unload, name)
        except AdapterInUseError as e:
            raise ApiError(409, str(e), "conflict_error", "name") from None
        for gone in [name, *self.registered_stores.pop(name, [])]:
            self.registered.pop(gone, None)
            self.paths.pop(gone, None)
        if not known and not unloaded:
            raise ApiError(404, f"adapter {name!r} is not loaded", "not_found_error", "name", "model_not_found")
        return {"name": name, "unloaded": True}

    # ---- requests, the batcher ------------------------------------------------------------------

    async def _tokenize(self, param: str, chars: int, encode, *args) -> list[int]:
        """Token ids, made in a worker thread (a long text would stall every stream on the event
        loop), after a cheap check that `chars` characters can fit the model's positions at all."""
        if self.max_positions and chars > self.max_positions * self.chars_per_token:
            raise ApiError(400, f"{param}: {chars} characters cannot fit the model's {self.max_positions} positions "
                           f"(a token holds at most {self.chars_per_token} characters)", "invalid_request_error", param)
        ids = list(await asyncio.get_running_loop().run_in_executor(None, encode, *args))
        if not ids:
            raise ApiError(400, f"{param}: empty (no tokens to continue)", "invalid_request_error", param)
        return ids

    async def _request(self, req, prompt_ids: list[int]) -> asyncio.Queue:
        """Resolve the model, check limits, queue the request; returns the queue its text arrives on."""
        adapter = await self._adapter(req.model)
        max_tokens = req.max_tokens or min(16, self.cfg.max_tokens_limit)
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {self.cfg.max_tokens_limit}",
                           "invalid_request_error", "max_tokens")
        if self.max_positions and len(prompt_ids) + max_tokens > self.max_positions:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"{self.max_positions} positions", "invalid_request_error", "max_tokens")
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            stop=req.stops(), seed=req.seed)
        out: asyncio.Queue = asyncio.Queue()
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        await self.queue.put((GenRequest(prompt_ids, adapter, sampling), out))
        return out

    async def _adapter(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), or a 404. Loading is the batch's."""
        if model == self.base_id:
            return None
        try:
            path = self.registered.get(model) or self.store.find(model)
        except StoreError:
            path = None
        if path is None:
            raise ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model",
                           "model_not_found")
        # the engine loads the files at this path as they are when the request is admitted: a new
        # path or files rewritten in place (retrained) are a new version, beside the running one
        self.paths[model] = path
        if path not in self.store_paths and is_compressed_store(path):
            self.store_paths.add(path)
        return model

    def _slot_of(self, adapter: str):
        """What an adapter takes of the engine's slots: its own, or its compressed store's (shared)."""
        path = self.paths.get(adapter)
        return path if path in self.store_paths else adapter

    async def _load(self, name: str, path: Path) -> float:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.load, name, path)
        except NoFreeSlot as e:
            raise _api_error_of(e) from None
        except AdapterLoadError as e:  # the client named files that are no adapter: its request is at fault
            raise ApiError(400, f"path: {e}", "invalid_request_error", "path") from None

    async def _batcher(self) -> None:
        """Continuous batching: between two tokens of the running batch, queued requests join it
        (up to `max_batch` rows, and no more distinct adapters than the LRU holds; the adapters of
        one compressed store count as one)."""
        loop = asyncio.get_running_loop()
        running, held = None, []  # held: requests waiting for an adapter slot or a row
        while True:
            if running is None and not held:
                held.append(await self.queue.get())
                await asyncio.sleep(self.cfg.batch_wait_ms / 1000)  # let a burst arrive together
            while not self.queue.empty():
                held.append(self.queue.get_nowait())
            rows = [] if running is None else running.rows
            slots = {self._slot_of(r.req.adapter) for r in rows if r.req.adapter is not None}
            admit, keep = [], []
            for req, out in held:
                slot = None if req.adapter is None else self._slot_of(req.adapter)
                fits = len(rows) + len(admit) < self.cfg.max_batch and (
                    slot is None or slot in slots or len(slots) < self.engine.max_adapters)
                (admit if fits else keep).append((req, out))
                if fits and slot is not None:
                    slots.add(slot)
            held = keep
            running = await loop.run_in_executor(None, self._step, running, admit, loop)

    def _step(self, running, admit, loop):
        def deliver(out, text, finish, n):
            loop.call_soon_threadsafe(out.put_nowait, (text, finish, n))

        def fail(out, error):
            loop.call_soon_threadsafe(out.put_nowait, error)

        admit = [(req, out) for req, out in admit if out not in self.abandoned]  # clients gone while queued
        try:
            running, _ = self.engine.step(running, [(out, req) for req, out in admit], deliver, dict(self.paths), fail)
            return running
        except Exception as e:  # the forward failed: the whole batch is lost; the server goes on
            log.exception("generation step failed")
            for out in [r.key for r in (running.rows if running else [])] + [out for _, out in admit]:
                fail(out, e)
            return None

    async def _first(self, out: asyncio.Queue) -> tuple:
        """A request's first event, awaited before a stream starts: a failure becomes an HTTP error,
        not a stream that breaks after its 200."""
        try:
            item = await out.get()
        except asyncio.CancelledError:  # the client went away (Serve cancels the handler)
            self._abandon(out)
            raise
        if isinstance(item, Exception):
            raise _api_error_of(item)
        return item

    async def _events(self, out: asyncio.Queue, first: tuple, chunk, usage_chunk, opening: dict | None = None):
        """A streamed response's server-sent events: `opening`, chunk(text, finish) per delta, then
        usage_chunk(tokens) unless it gives None, then [DONE]. A request that breaks after the stream
        has started (its adapter's logits went non-finite, say) ends with an error event in OpenAI's
        shape, then [DONE], as OpenAI and vLLM end theirs; the other requests are not touched."""
        if opening is not None:
            yield api.sse(opening)
        n = 0
        try:
            async for text, finish, n in self._stream(out, first):  # noqa: B007 (the last count is the usage)
                yield api.sse(chunk(text, finish))
        except Exception as e:
            log.warning("a streamed request failed after its first event: %s", e)
            yield api.sse(_api_error_of(e).body)
        else:
            usage = usage_chunk(n)
            if usage is not None:
                yield api.sse(usage)
        yield "data: [DONE]\n\n"

    async def _stream(self, out: asyncio.Queue, first: tuple | None = None):
        """(text, finish_reason, tokens so far) events until the request ends. If it is left before
        (the client went away: the response is cancelled or its generator closed), the request is
        cancelled: no more tokens are made for it."""
        ended = False
        try:
            while True:
                item, first = (first, None) if first is not None else (await out.get(), None)
                if isinstance(item, Exception):
                    ended = True
                    raise item
                text, finish, n = item
                ended = finish is not None
                if text or finish:
                    yield text, finish, n
                if ended:
                    return
        finally:
            if not ended:
                self._abandon(out)

    def _abandon(self, out: asyncio.Queue) -> None:
        self.abandoned.add(out)  # if it is still queued, it is never admitted
        self.engine.cancel(out)  # if it is running, its row leaves the batch before the next token

    def engine_stats(self) -> dict:
        """The engine's state, for tests and debugging through a deployment handle (no HTTP route)."""
        return {"running_rows": self.engine.running_rows, "versions": len(self.engine.versions),
                "adapter_bytes": self.engine.am.adapter_bytes()}

    async def _collect(self, out: asyncio.Queue) -> tuple[str, str, int]:
        parts, finish, n = [], None, 0
        try:
            async for text, finish, n in self._stream(out):  # noqa: B007 (the last event's finish and count)
                parts.append(text)
        except Exception as e:
            raise _api_error_of(e) from None
        return "".join(parts), finish, n


def build(cfg: ServeConfig | dict, **deployment_options):
    """The Serve application for a config (what `rayft serve` and serve/app.py run)."""
    cfg = ServeConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    cfg = cfg.model_copy(update={"store": cfg.store.resolve()})  # the replicas' working dir is not ours
    return AdapterServer.options(**deployment_options).bind(cfg.model_dump(mode="json"))
