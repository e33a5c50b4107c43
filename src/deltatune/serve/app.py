"""The HTTP API over many deltas on one base (FastAPI; run by `deltatune serve` under uvicorn).

    POST   /v1/predict        {"task": "stsb", "inputs": [["a", "b"], ...]}  or  [{"task": ..., "input": ...}, ...]
    GET    /v1/tasks          every served task: labels, metric, method, delta bytes, base fingerprint
    POST   /v1/tasks          {"path": RUN_DIR, "name": optional}: attach a delta (--allow-admin, inside --delta-root)
    DELETE /v1/tasks/{name}   detach it once its queued requests are answered (--allow-admin)
    GET    /health            liveness, queue depth;  GET /docs: OpenAPI

Requests share forward passes, across tasks, up to `max_batch_size` rows (a request is never split): a
batch closes when full, or `batch_wait_ms` after the later of its first request's arrival and the end of the
previous forward (under a closed loop of clients, the requests that queued during a forward then wait for
those its answers bring back, instead of running as a half-size batch). The queue is bounded (503 with Retry-After when
full), every request has a deadline (504), and every bad input gets a 4xx whose message starts with
the field it is about. The model runs on one worker thread; the event loop only parses, queues and
answers. Bodies are read up to `max_body_bytes` and parsed as JSON by hand: nothing in a request is
ever used as a path, except the admin attach path, which must resolve inside `--delta-root`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from deltatune.errors import DeltatuneError
from deltatune.serve.multi import MultiTaskModel, check_example
from deltatune.serve.settings import ServeSettings


class RequestError(Exception):
    """A request the client must fix: an HTTP status and a message that starts with the field."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ----------------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    rows: list[tuple[str, ...]]
    names: list[str]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects requests into shared forward passes and runs them on the model's one worker thread."""

    def __init__(self, engine: MultiTaskModel, settings: ServeSettings) -> None:
        self.engine, self.settings = engine, settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-model")
        self.queue: deque[_Pending] = deque()
        self.queued_rows = 0
        self.per_task: Counter = Counter()
        """Rows queued or running per task (a detach waits for its task's to reach 0)."""
        self.closing: set[str] = set()
        self.batches = 0
        """Forward batches run so far (requests that arrive together share one)."""
        self.model_free_at = 0.0
        """When the last forward batch ended (time.perf_counter)."""
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def run_on_model(self, function, *args):
        """Run `function` on the model's thread (between batches, never beside one)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def submit(self, rows: list[tuple[str, ...]], names: list[str]) -> list[dict]:
        closing = sorted(set(names) & self.closing)
        if closing:
            raise RequestError(404, f"task: {closing[0]!r} is being detached and takes no new requests.")
        if self.queued_rows + len(rows) > self.settings.max_queue:
            raise RequestError(
                503,
                f"queue: {self.queued_rows} inputs are waiting (limit {self.settings.max_queue}); retry shortly.",
                {"Retry-After": "1"},
            )
        pending = _Pending(rows, names, asyncio.get_running_loop().create_future())
        self.queue.append(pending)
        self.queued_rows += len(rows)
        self.per_task.update(names)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            pending.future.cancel()  # skipped if it has not run yet
            raise RequestError(
                504,
                f"request: not answered within {self.settings.request_timeout_s:g} s "
                "(--request-timeout-s); the server is overloaded or the inputs are very long.",
            ) from None

    async def _next_batch(self) -> list[_Pending]:
        while not self.queue:
            self._arrived.clear()
            await self._arrived.wait()
        # closed from batch_wait_ms after the later of its first request and the end of the previous forward:
        # requests that queued while the model was busy still wait that long for the ones its answers bring back
        deadline = max(self.queue[0].queued_at, self.model_free_at) + self.settings.batch_wait_ms / 1000
        while self.queued_rows < self.settings.max_batch_size and time.perf_counter() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.perf_counter())
            except asyncio.TimeoutError:
                break
        batch: list[_Pending] = []
        rows = 0
        while self.queue and (not batch or rows + len(self.queue[0].rows) <= self.settings.max_batch_size):
            pending = self.queue.popleft()
            self.queued_rows -= len(pending.rows)
            batch.append(pending)
            rows += len(pending.rows)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [pending for pending in batch if not pending.future.done()]
            try:
                if live:
                    rows = [row for pending in live for row in pending.rows]
                    names = [name for pending in live for name in pending.names]
                    results = await self.run_on_model(self._predict, rows, names)
                    self.batches += 1
                    start = 0
                    for pending in live:
                        if not pending.future.done():
                            pending.future.set_result(results[start : start + len(pending.rows)])
                        start += len(pending.rows)
            except Exception as error:  # one failed batch answers its requests, and the server goes on
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(error)
            finally:
                if live:  # a forward that failed kept the model busy as long as one that answered
                    self.model_free_at = time.perf_counter()
                for pending in batch:
                    self.per_task.subtract(pending.names)

    async def detach(self, name: str) -> None:
        """Detach delta `name` once the requests already queued for it are answered (new ones get 404)."""
        self.closing.add(name)
        try:
            deadline = time.perf_counter() + self.settings.request_timeout_s
            while self.per_task[name] > 0 and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            await self.run_on_model(self.engine.detach, name)
        finally:
            self.closing.discard(name)

    def _predict(self, rows, names) -> list[dict]:
        return self.engine.predict(
            rows, task=names, batch_size=self.settings.max_batch_size, precision=self.settings.precision
        )


# ---------------------------------------------------------------------------------- parsing


def parse_predict(body: object, engine: MultiTaskModel, settings: ServeSettings) -> tuple[list, list[str]]:
    """(rows, task names) from a predict body, or a RequestError whose message starts with the field."""
    if isinstance(body, dict):
        unknown = sorted(set(body) - {"task", "inputs"})
        if unknown:
            raise RequestError(
                422,
                f"{unknown[0]}: unknown field; a predict body has 'task' and 'inputs' (or is a "
                "list of {'task', 'input'} objects).",
            )
        if "task" not in body:
            raise RequestError(422, "task: required (the name of a served task; see GET /v1/tasks).")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise RequestError(
                422, "inputs: required, a non-empty list of examples (a text, or a list of texts for a pair task)."
            )
        check_count(len(inputs), "inputs", settings)
        served = served_task(body["task"], "task", engine)
        rows = [
            check_text_lengths(example_of(example, served, f"inputs[{i}]"), f"inputs[{i}]", settings)
            for i, example in enumerate(inputs)
        ]
        return rows, [served.name] * len(rows)
    if isinstance(body, list):
        if not body:
            raise RequestError(422, "body: an empty list; send at least one {'task': ..., 'input': ...}.")
        check_count(len(body), "body", settings)
        rows, names = [], []
        for position, item in enumerate(body):
            where = f"[{position}]"
            if not isinstance(item, dict) or set(item) != {"task", "input"}:
                raise RequestError(
                    422, f"{where}: must be an object with exactly 'task' and 'input', got {json.dumps(item)[:60]}."
                )
            served = served_task(item["task"], f"{where}.task", engine)
            rows.append(
                check_text_lengths(example_of(item["input"], served, f"{where}.input"), f"{where}.input", settings)
            )
            names.append(served.name)
        return rows, names
    raise RequestError(
        422, "body: expected an object {'task': ..., 'inputs': [...]} or a list of {'task': ..., 'input': ...} objects."
    )


def check_count(count: int, where: str, settings: ServeSettings) -> None:
    if count > settings.max_inputs:
        raise RequestError(
            413,
            f"{where}: {count} inputs, more than the limit of {settings.max_inputs} per request "
            "(--max-inputs); split the request.",
        )


def served_task(name: object, where: str, engine: MultiTaskModel):
    if not isinstance(name, str) or name not in engine.tasks:
        served = ", ".join(map(repr, engine.tasks)) or "none"
        raise RequestError(
            404 if isinstance(name, str) else 422,
            f"{where}: no task named {json.dumps(name)[:60]} is served; served: {served}.",
        )
    return engine.tasks[name]


def example_of(example: object, served, where: str) -> tuple[str, ...]:
    try:
        return check_example(example, served.task, where)
    except DeltatuneError as error:
        raise RequestError(422, str(error)) from None


def check_text_lengths(texts: tuple[str, ...], where: str, settings: ServeSettings) -> tuple[str, ...]:
    for position, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise RequestError(
                413,
                f"{where}[{position}]: {len(text)} characters, more than the limit of "
                f"{settings.max_text_chars} (--max-text-chars).",
            )
    return texts


async def read_json(request, settings: ServeSettings) -> object:
    """The body as JSON, read no further than `max_body_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise RequestError(
            413, f"body: {declared} bytes, more than the limit of {settings.max_body_bytes} (--max-body-bytes)."
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise RequestError(413, f"body: more than the limit of {settings.max_body_bytes} bytes (--max-body-bytes).")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"body: not valid JSON ({error}).") from None


def admin_path(body: object, settings: ServeSettings) -> tuple[Path, str | None]:
    """The run directory to attach (inside --delta-root, symlinks resolved) and the name asked for."""
    if not isinstance(body, dict) or not isinstance(body.get("path"), str) or set(body) - {"path", "name"}:
        raise RequestError(422, "path: required, a run directory inside --delta-root (and optionally 'name').")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise RequestError(422, "name: must be a string.")
    if settings.delta_root is None:  # the settings demand --delta-root with --allow-admin
        raise RequestError(403, "attaching deltas needs a server started with --allow-admin and --delta-root.")
    root = Path(settings.delta_root).resolve()
    candidate = Path(body["path"])
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise RequestError(403, f"path: {body['path']!r} is outside --delta-root; attach deltas from inside it.")
    return resolved, name


# ---------------------------------------------------------------------------------------- app


def create_app(engine: MultiTaskModel, settings: ServeSettings):
    """The FastAPI application serving `engine`'s tasks under `settings`."""
    batcher_holder: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(engine, settings)
        batcher_holder["batcher"] = batcher
        batcher.start()
        with engine.serving():
            try:
                yield
            finally:
                await batcher.stop()  # uvicorn has drained the in-flight requests by now

    app = FastAPI(
        title="deltatune",
        version=_version(),
        lifespan=lifespan,
        description="Many task deltas served from one frozen backbone.",
    )

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(DeltatuneError)
    async def deltatune_error(request, error: DeltatuneError):  # e.g. its task was detached while it waited
        return JSONResponse({"detail": f"request: {error}"}, status_code=409)

    authorised, admin = _guards(settings)
    guarded = [Depends(authorised)]

    @app.get("/health")
    async def health() -> dict:
        batcher = batcher_holder.get("batcher")
        return {
            "status": "ok",
            "tasks": len(engine.tasks),
            "queued_inputs": batcher.queued_rows if batcher else 0,
            "batches": batcher.batches if batcher else 0,
        }

    @app.get("/v1/tasks", dependencies=guarded)
    async def tasks() -> dict:
        return {
            "tasks": [served.describe(engine.fingerprint) for served in list(engine.tasks.values())],
            "base_model": engine.base_name,
            "base_fingerprint": engine.fingerprint,
        }

    @app.post("/v1/predict", dependencies=guarded, openapi_extra=_PREDICT_SCHEMA)
    async def predict(request: Request) -> JSONResponse:
        rows, names = parse_predict(await read_json(request, settings), engine, settings)
        # plain JSON types already: answered as they are, without FastAPI's encoding pass over every field
        return JSONResponse({"predictions": await batcher_holder["batcher"].submit(rows, names)})

    @app.post("/v1/tasks", dependencies=[*guarded, Depends(admin)], status_code=201, openapi_extra=_ATTACH_SCHEMA)
    async def attach(request: Request) -> dict:
        path, name = admin_path(await read_json(request, settings), settings)
        try:
            served = await batcher_holder["batcher"].run_on_model(engine.attach, path, name)
        except DeltatuneError as error:
            raise RequestError(409 if "already attached" in str(error) else 422, f"path: {error}") from None
        return served.describe(engine.fingerprint)

    @app.delete("/v1/tasks/{name}", dependencies=[*guarded, Depends(admin)])
    async def detach(name: str) -> dict:
        served_task(name, "name", engine)
        await batcher_holder["batcher"].detach(name)
        return {"detached": name}

    return app


def _guards(settings: ServeSettings):
    """The two request checks: a bearer token when the server has --api-key; admin routes only with
    --allow-admin."""

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise RequestError(
                401,
                "authorization: missing or wrong bearer token; send "
                "'Authorization: Bearer KEY' with the server's --api-key.",
                {"WWW-Authenticate": "Bearer"},
            )

    def admin(request: Request) -> None:
        if not settings.allow_admin:
            raise RequestError(
                403,
                "admin: attaching and detaching deltas is off; start the server with --allow-admin --delta-root DIR.",
            )

    return authorised, admin


def _version() -> str:
    from deltatune.version import __version__

    return __version__


_EXAMPLE = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}]}
_PREDICT_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["task", "inputs"],
                            "additionalProperties": False,
                            "properties": {
                                "task": {"type": "string"},
                                "inputs": {"type": "array", "minItems": 1, "items": _EXAMPLE},
                            },
                        },
                        {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["task", "input"],
                                "additionalProperties": False,
                                "properties": {"task": {"type": "string"}, "input": _EXAMPLE},
                            },
                        },
                    ]
                }
            }
        },
    }
}
_ATTACH_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["path"],
                    "additionalProperties": False,
                    "properties": {"path": {"type": "string"}, "name": {"type": "string"}},
                }
            }
        },
    }
}


__all__ = ["Batcher", "RequestError", "create_app", "parse_predict"]
