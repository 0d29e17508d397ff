"""The server's metrics in Prometheus' text format (prometheus_client), and the ASGI layer that
counts every request.

Each server has a registry of its own, so that several in one process (tests) do not share counts.
A request is counted when its response starts, before the client can read any of it: a client
that reads /metrics after a response finds that response counted.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SENTENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServeMetrics:
    """The counters, gauge and histograms of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("transformer_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("transformer_serve_errors", "requests answered with an error status (4xx or 5xx)",
                              ["endpoint", "status"], registry=r)
        self.sentences = Counter("transformer_serve_sentences", "sentences translated", ["model"], registry=r)
        self.tokens = Counter("transformer_serve_tokens", "pieces read (source, EOS included) and written (target: "
                              "the best translations, EOS excluded)", ["model", "side"], registry=r)
        self.latency = Histogram("transformer_serve_request_seconds", "time from a request's arrival to its "
                                 "response, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_sentences = Histogram("transformer_serve_batch_sentences", "sentences in each batch the batcher "
                                         "formed", ["model"], buckets=BATCH_SENTENCE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("transformer_serve_batch_tokens", "source tokens in each batch the batcher "
                                      "formed", ["model"], buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("transformer_serve_batch_seconds", "decoding time of each batch the batcher "
                                       "formed", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("transformer_serve_in_flight", "requests admitted to the models and not yet "
                               "answered", registry=r)

    def batch(self, model: str, sentences: int, tokens: int, seconds: float) -> None:
        """Record one batch the batcher formed and decoded."""
        self.batch_sentences.labels(model).observe(sentences)
        self.batch_tokens.labels(model).observe(tokens)
        self.batch_seconds.labels(model).observe(seconds)

    def translated(self, model: str, sentences: int, source_tokens: int, target_tokens: int) -> None:
        """Record the sentences and pieces of one answered translation request."""
        self.sentences.labels(model).inc(sentences)
        self.tokens.labels(model, "source").inc(source_tokens)
        self.tokens.labels(model, "target").inc(target_tokens)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


def counting(app: ASGIApp, metrics: ServeMetrics, endpoints: Iterable[str]) -> ASGIApp:
    """`app` with every HTTP request counted, timed and, at a status of 400 or more, counted as an error.

    Args:
        endpoints: the paths counted under their own name; any other path counts as "other", so
            that scanning for pages cannot make a label per path.
    """
    known = frozenset(endpoints)

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in known else "other"

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = str(message["status"])
                metrics.requests.labels(endpoint, status).inc()
                if message["status"] >= 400:
                    metrics.errors.labels(endpoint, status).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        await app(scope, receive, send_counted)

    return counted
