"""The server as an ASGI application (Starlette): routes that turn JSON into the decode settings the
commands use, call the engine through the batcher, and turn its n-best lists back into JSON; the
page; the metrics.

| route | what it does |
|---|---|
| `GET /` (`/app.js`, `/style.css`) | the page: static files shipped with the package |
| `GET /health` | {"status": "ok", "models": [names]} |
| `GET /models` | each model's languages, size, engine, precision and default decode settings; the limits |
| `POST /translate` | {"text": str or [str], "model"?, "beam"?, "n_best"?, "alpha"?} -> translations |
| `POST /attention` | {"text", "model"?} -> the pieces and every attention map of its translation |
| `POST /work` | {"text", "model"?} -> its translation's FLOPs and time by component |
| `GET /metrics` | Prometheus' text format |

Every error is a JSON object {"error": "one line"} with a 4xx status (or 500 for a fault of the
server, whose details go to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from importlib import resources
from typing import AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transformer.config import DecodeConfig
from transformer.decoding.engine import best, source_ids
from transformer.decoding.flops import COMPONENTS
from transformer.serve.attention import translation_attention
from transformer.serve.batcher import Batcher, BatcherClosed
from transformer.serve.metrics import CONTENT_TYPE, ServeMetrics, counting
from transformer.serve.models import ServedModel
from transformer.serve.requests import Limits, RequestError, TextRequest, text_request, translate_request
from transformer.serve.work import OTHER, SEARCH, TIMED, measure_translation

logger = logging.getLogger(__name__)

PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page loads nothing but its own files and talks to nothing but this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DRAINED_BODIES = 4  # a body up to this many times the size limit is read to its end before its 413
LABELS = {**COMPONENTS, OTHER: "layer norms and residuals", SEARCH: "log-softmax, top-k and beam bookkeeping"}

Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one-line JSON error every refusal answers with."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def answering(handler: Handler) -> Handler:
    """`handler` with its refusals as JSON errors, and any other failure as a 500 whose details
    are logged here and not sent."""
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as e:
            return error(e.status, e.message, {"Retry-After": "1"} if e.status == 503 else None)
        except BatcherClosed as e:
            return error(503, str(e))
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return error(500, "internal error: the server's log has the details")

    return answer


class Server:
    """The state behind the routes: the models, the batcher that runs them, the limits, the metrics.

    Args:
        models: the served models; the first is the default.
        limits: what a request may ask for.
        max_wait: seconds the batcher waits for more requests to join a batch.
        model_thread: run the models on a thread of the batcher's own; False: whoever serves the
            application runs them by calling `self.batcher.run()` (see `transformer.serve.batcher`).
    """

    def __init__(
        self, models: Sequence[ServedModel], limits: Limits = Limits(), max_wait: float = 0.005,
        model_thread: bool = True,
    ) -> None:
        if not models:
            raise ValueError("a server needs at least one model")
        if problems := limits.errors():
            raise ValueError(f"limits: {problems[0]}")
        self.models = {model.name: model for model in models}
        if len(self.models) < len(models):
            raise ValueError("two models have the same name")
        self.default = models[0].name
        self.limits = limits
        self.metrics = ServeMetrics()
        self.batcher = Batcher(max_wait, on_batch=self.metrics.batch, own_thread=model_thread)
        self.pages = {path: (resources.files("transformer.serve").joinpath("static", name).read_bytes(), media)
                      for path, (name, media) in PAGES.items()}
        self._in_flight = 0

    def close(self) -> None:
        """Stop the batcher; requests still waiting get 503."""
        self.batcher.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The application's lifetime: the batcher stops when the server does."""
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # The routes.

    async def page(self, request: Request) -> Response:
        """GET /, /app.js, /style.css: the page's files."""
        body, media = self.pages[request.url.path]
        return Response(body, media_type=media, headers=PAGE_HEADERS)

    async def health(self, request: Request) -> Response:
        """GET /health: the server answers, and which models it has."""
        return JSONResponse({"status": "ok", "models": list(self.models)})

    async def list_models(self, request: Request) -> Response:
        """GET /models: each model's description (`ServedModel.describe`) and the limits."""
        return JSONResponse({"default": self.default, "models": [m.describe() for m in self.models.values()],
                             "limits": dataclasses.asdict(self.limits)})

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics: every metric in Prometheus' text format."""
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def translate(self, request: Request) -> Response:
        """POST /translate: the texts' translations (and n-best lists when asked), decoded in the batcher."""
        start = time.perf_counter()
        asked = translate_request(await self._body(request), self.limits)
        model = self._model(asked.model)
        given = {"beam_size": asked.beam, "n_best": asked.n_best, "length_penalty": asked.alpha}
        settings = self._settings(model, **{k: v for k, v in given.items() if v is not None})
        sources = source_ids(model.engine.src_tokenizer, asked.texts, model.engine.max_src_len)
        tokens = sum(map(len, sources))
        key = (model.name, settings.beam_size, settings.n_best, settings.length_penalty)
        async with self._admitted():
            found, batch = await self.batcher.search(
                key, sources, tokens, settings.batch_tokens, lambda ids: model.engine.search(ids, settings), model.name)
        candidates = model.engine.candidates(found)
        self.metrics.translated(model.name, len(sources), tokens, sum(len(f[0].tokens) for f in found if f))
        answer: dict = {"model": model.name, "translations": best(candidates)}
        if asked.n_best is not None:
            answer["n_best"] = [[{"text": c.text, "score": c.score} for c in listed] for listed in candidates]
        answer["timings"] = {"queue_ms": _ms(batch.waited), "decode_ms": _ms(batch.seconds),
                             "total_ms": _ms(time.perf_counter() - start), "batch_sentences": batch.sentences}
        return JSONResponse(answer)

    async def attention(self, request: Request) -> Response:
        """POST /attention: a sentence's translation and every attention map of the pair."""
        start = time.perf_counter()
        model, source = self._one_sentence(text_request(await self._body(request), self.limits), "/attention")
        torch_model, settings, limit = model.torch_model, model.decode, self.limits.max_attention_pieces
        async with self._admitted():
            answer = await self.batcher.call(
                lambda: translation_attention(model.engine, torch_model, source, settings, limit))
        return JSONResponse({"model": model.name, **answer, "timings": {"total_ms": _ms(time.perf_counter() - start)}})

    async def work(self, request: Request) -> Response:
        """POST /work: a sentence's translation, its FLOPs by component and the time each took."""
        model, source = self._one_sentence(text_request(await self._body(request), self.limits), "/work")
        torch_model, settings = model.torch_model, model.decode
        async with self._admitted():
            found, work = await self.batcher.call(
                lambda: measure_translation(torch_model, model.shape, source, settings))
        components = [{"side": side, "component": component, "label": LABELS[component],
                       "flops": work.flops.get((side, component), 0), "ms": _ms(work.seconds[side, component])}
                      for side, component in TIMED]
        return JSONResponse({
            "model": model.name, "translation": model.engine.tgt_tokenizer.decode(found[0].tokens),
            "source_pieces": work.source_pieces, "steps": work.steps, "beam": work.beam_size,
            "use_cache": work.use_cache, "components": components, "flops": sum(work.flops.values()),
            "flops_without_cache": work.flops_without_cache, "ms": _ms(sum(work.seconds.values())),
            "wall_ms": _ms(work.wall_seconds),
        })

    # What the routes share.

    async def _body(self, request: Request) -> bytes:
        """The request body, refused when over the size limit (413) or slower than the time limit (408).

        A body somewhat over the limit is read to its end (and dropped) before the refusal: a
        client that is still sending when the server closes the connection would otherwise find it
        reset and never read the 413. One declared larger than `DRAINED_BODIES` times the limit is
        refused at once.
        """
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > DRAINED_BODIES * limit:
            raise RequestError(413, f"the request body has {int(length)} bytes, more than the {limit} bytes allowed")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > DRAINED_BODIES * limit:
                    break
            if size > limit:
                raise RequestError(413, f"the request body has more than the {limit} bytes allowed")
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.limits.body_seconds)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.limits.body_seconds:g} "
                                    "seconds") from None
        except ClientDisconnect:
            raise RequestError(400, "the client went away before sending its request body") from None

    def _model(self, name: str | None) -> ServedModel:
        """The model a request names (the default when it names none)."""
        if name is None:
            return self.models[self.default]
        if name not in self.models:
            raise RequestError(404, f'no model named "{name[:60]}"; this server has {", ".join(self.models)}')
        return self.models[name]

    def _settings(self, model: ServedModel, **given: float) -> DecodeConfig:
        """The model's decode settings with a request's put over them, checked as a config is."""
        settings = dataclasses.replace(model.decode, **given)
        if settings.n_best > settings.beam_size:
            raise RequestError(422, f'"n_best" ({settings.n_best}) cannot be more than the beam '
                                    f'({settings.beam_size})')
        if settings.rerank_with is not None and settings.beam_size < 2:
            raise RequestError(422, f'model "{model.name}" reranks its beam\'s candidates: "beam" must be 2 or more')
        # Only what the request changed is checked: an engine may describe its own settings in ways the
        # config does not take (CTranslate2's precision is "as exported").
        if problems := [p for p in settings.errors() if p not in model.decode.errors()]:
            raise RequestError(422, f"these settings do not go together: {problems[0]}")
        return settings

    def _one_sentence(self, asked: TextRequest, route: str) -> tuple[ServedModel, list[int]]:
        """The model and source ids of an /attention or /work request, which read this package's model."""
        model = self._model(asked.model)
        if model.torch_model is None:
            raise RequestError(422, f'model "{model.name}" runs on CTranslate2, which gives no attention weights or '
                                    f"per-layer work of its own: {route} needs a model served with --engine torch")
        source = source_ids(model.engine.src_tokenizer, [asked.text])[0]
        if not source:
            raise RequestError(422, '"text" has no pieces to translate')
        if len(source) > self.limits.max_attention_pieces:
            raise RequestError(413, f'"text" has {len(source)} pieces with EOS, more than the '
                                    f"{self.limits.max_attention_pieces} an answer of {route} may hold")
        return model, source

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """Hold one of the `max_in_flight` places for a request that waits for the models (503 when none is free)."""
        if self._in_flight >= self.limits.max_in_flight:
            raise RequestError(503, f"the server is busy: {self._in_flight} requests are waiting for the models, the "
                                    "most it takes; try again shortly")
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def create_app(
    models: Sequence[ServedModel], limits: Limits = Limits(), max_wait: float = 0.005, model_thread: bool = True,
) -> Starlette:
    """The server's ASGI application; `app.state.server` is its `Server` (see it for the arguments)."""
    server = Server(models, limits, max_wait, model_thread)
    routes = [Route(path, answering(server.page), methods=["GET"]) for path in PAGES] + [
        Route("/health", answering(server.health), methods=["GET"]),
        Route("/models", answering(server.list_models), methods=["GET"]),
        Route("/metrics", answering(server.metrics_text), methods=["GET"]),
        Route("/translate", answering(server.translate), methods=["POST"]),
        Route("/attention", answering(server.attention), methods=["POST"]),
        Route("/work", answering(server.work), methods=["POST"]),
    ]

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        if e.status_code == 404:
            return error(404, f"no such page: {request.url.path[:100]}")
        if e.status_code == 405:
            allowed = e.headers.get("Allow", "") if e.headers else ""
            return error(405, f"{request.method} is not allowed on {request.url.path}; use {allowed}",
                         {"Allow": allowed})
        return error(e.status_code, str(e.detail))

    endpoints = [route.path for route in routes]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=server.lifespan,
                    middleware=[Middleware(counting, metrics=server.metrics, endpoints=endpoints)])
    app.state.server = server
    return app
