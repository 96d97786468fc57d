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
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rayft.config import BaseModelConfig, ServeConfig
from rayft.serving import openai_api as api
from rayft.serving.engine import AdapterLoadError, GenerationEngine, GenRequest, Sampling
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
    field = ".".join(str(x) for x in first["loc"] if x != "body") or None
    msg = first["msg"] if first.get("type") != "json_invalid" else f"malformed JSON: {first['msg']}"
    return JSONResponse(api.error_body(f"{field}: {msg}" if field else msg, "invalid_request_error", field),
                        status_code=400)


def base_model_of(cfg: ServeConfig) -> BaseModelConfig:
    """The configured base model, else the one every adapter in the store names."""
    if cfg.base_model is not None:
        return cfg.base_model
    named = {}
    for name, path in AdapterStore(cfg.store).list().items():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            named.setdefault(base, []).append(name)
    if len(named) != 1:
        raise ValueError(
            f"store {cfg.store}: cannot tell the base model from its adapters "
            f"({'none names one' if not named else 'they name ' + ', '.join(sorted(named))}); set base_model")
    return BaseModelConfig(path=next(iter(named)))


def _api_error_of(e: Exception) -> ApiError:
    if isinstance(e, AdapterLoadError):
        return ApiError(500, str(e), "adapter_load_error", "model")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


# (helpers stay above the class: Serve pickles the decorated class with the globals it sees then)
# many requests in flight per replica: they are what a batch is made of (Serve's default is 5)
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
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
        self.paths: dict[str, Path] = {}  # every adapter requests have named, for the batcher to load
        self.queue: asyncio.Queue | None = None
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    # ---- routes ---------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict:
        data = [{"id": self.base_id, "object": "model", "owned_by": "rayft", "parent": None, "root": self.base_id}]
        for name, path in sorted({**self.store.list(), **self.registered}.items()):
            data.append({"id": name, "object": "model", "owned_by": "rayft", "parent": self.base_id,
                         "root": str(path), "loaded": name in self.engine.loaded})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(self, req: api.CompletionRequest):
        try:
            prompt = req.prompt_text()
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "prompt") from None
        ids = self.engine.tokenizer.encode(prompt)
        gen = await self._request(req, ids)
        rid = api.new_id("cmpl")
        if req.stream:
            first = await self._first(gen)

            async def events():
                async for text, finish, _ in self._stream(gen, first):
                    yield api.sse(api.completion_body(rid, req.model, text, finish))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, finish, n = await self._collect(gen)
        return api.completion_body(rid, req.model, text, finish, api.usage(len(ids), n))

    @app.post("/v1/chat/completions")
    async def chat(self, req: api.ChatRequest):
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"model {self.base_id} has no chat template; use /v1/completions",
                           "invalid_request_error", "messages")
        ids = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        gen = await self._request(req, ids)
        rid = api.new_id("chatcmpl")
        if req.stream:
            first = await self._first(gen)

            async def events():
                yield api.sse(api.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
                async for text, finish, _ in self._stream(gen, first):
                    yield api.sse(api.chat_chunk(rid, req.model, {"content": text} if text else {}, finish))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, finish, n = await self._collect(gen)
        return api.chat_body(rid, req.model, text, finish, api.usage(len(ids), n))

    @app.post("/v1/adapters")
    async def load_adapter(self, req: api.LoadAdapterRequest) -> dict:
        try:
            check_name(req.name)
            path = self.store.inside(req.path)
        except StoreError as e:
            raise ApiError(400, str(e), "invalid_request_error", "path" if "path" in str(e) else "name") from None
        if not (path / "adapter_config.json").is_file():
            raise ApiError(404, f"no adapter at {req.path!r} in the store (no adapter_config.json)",
                           "not_found_error", "path")
        seconds = await self._load(req.name, path)
        self.registered[req.name] = path
        return {"name": req.name, "path": str(path), "load_seconds": seconds}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(self, name: str) -> dict:
        known = name in self.registered or name in self.engine.loaded
        self.registered.pop(name, None)
        try:
            unloaded = await asyncio.get_running_loop().run_in_executor(None, self.engine.unload, name)
        except AdapterLoadError as e:
            raise ApiError(409, str(e), "conflict_error", "name") from None
        if not known and not unloaded:
            raise ApiError(404, f"adapter {name!r} is not loaded", "not_found_error", "name", "model_not_found")
        return {"name": name, "unloaded": True}

    # ---- requests, the batcher ------------------------------------------------------------------

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
        if self.engine.loaded.get(model, path) != path:  # retrained: the name points at a new version
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.unload, model)
            except AdapterLoadError:
                pass  # still generating with the old version: it is replaced once those requests end
        self.paths[model] = path
        return model

    async def _load(self, name: str, path: Path) -> float:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.load, name, path)
        except AdapterLoadError as e:
            raise ApiError(500, str(e), "adapter_load_error", "model") from None

    async def _batcher(self) -> None:
        """Continuous batching: between two tokens of the running batch, queued requests join it
        (up to `max_batch` rows, and no more distinct adapters than the LRU holds)."""
        loop = asyncio.get_running_loop()
        running, held = None, []  # held: requests waiting for an adapter slot or a row
        while True:
            if running is None and not held:
                held.append(await self.queue.get())
                await asyncio.sleep(self.cfg.batch_wait_ms / 1000)  # let a burst arrive together
            while not self.queue.empty():
                held.append(self.queue.get_nowait())
            rows = [] if running is None else running.rows
            adapters = {r.req.adapter for r in rows} - {None}
            admit, keep = [], []
            for req, out in held:
                fits = len(rows) + len(admit) < self.cfg.max_batch and (
                    req.adapter is None or req.adapter in adapters or len(adapters) < self.engine.max_adapters)
                (admit if fits else keep).append((req, out))
                if fits and req.adapter is not None:
                    adapters.add(req.adapter)
            held = keep
            running = await loop.run_in_executor(None, self._step, running, admit, loop)

    def _step(self, running, admit, loop):
        def deliver(out, text, finish, n):
            loop.call_soon_threadsafe(out.put_nowait, (text, finish, n))

        def fail(out, error):
            loop.call_soon_threadsafe(out.put_nowait, error)

        try:
            running, _ = self.engine.step(running, [(out, req) for req, out in admit], deliver, dict(self.paths), fail)
            return running
        except Exception as e:  # these requests fail with the reason; the server goes on
            log.exception("generation step failed")
            for out in [r.key for r in (running.rows if running else [])] + [out for _, out in admit]:
                fail(out, e)
            return None

    async def _first(self, out: asyncio.Queue) -> tuple:
        """A request's first event, awaited before a stream starts: a failure becomes an HTTP error,
        not a stream that breaks after its 200."""
        item = await out.get()
        if isinstance(item, Exception):
            raise _api_error_of(item)
        return item

    async def _stream(self, out: asyncio.Queue, first: tuple | None = None):
        """(text, finish_reason, tokens so far) events until the request ends."""
        while True:
            item, first = (first, None) if first is not None else (await out.get(), None)
            if isinstance(item, Exception):
                raise item
            text, finish, n = item
            if text or finish:
                yield text, finish, n
            if finish is not None:
                return

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
