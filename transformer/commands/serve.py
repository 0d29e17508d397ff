"""Serve trained models over HTTP: `transformer-serve --checkpoint CKPT`, then open http://127.0.0.1:8000/.

Each model is loaded as `transformer-translate` loads it (`options.load_engine`: the same engines,
precisions and decode settings), so that a request without settings gets the command's output.
`--model NAME=CKPT` may be given several times (a lone `--checkpoint CKPT` serves one model named
after its language pair, e.g. de-en); `--engine` and `--precision` take a value for every model or
NAME=VALUE for one. The application is `transformer.serve.app`, run by uvicorn on one process:
one event loop, on a thread of its own, reads requests and writes answers, and the main thread runs
the models (docs/serve.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from transformer.checkpoint import CheckpointError
from transformer.commands.options import load_engine, prepare
from transformer.serve.batcher import Batcher
from transformer.serve.models import ServedModel
from transformer.serve.requests import Limits

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENGINES = ("torch", "ctranslate2")
PRECISIONS = ("fp32", "bf16", "int8", "auto")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve, as the command line names it.

    Attributes:
        name: its name in requests; None: its language pair, once loaded.
        path: the checkpoint (or, with engine ctranslate2, the exported folder).
        engine: "torch" or "ctranslate2".
        precision: "fp32", "bf16", "int8" or "auto"; None: the checkpoint's (or the export's).
    """

    name: str | None
    path: str
    engine: str = "torch"
    precision: str | None = None

    def arguments(self, device: str) -> argparse.Namespace:
        """The options `transformer-translate` would have for this model (`options.prepare`, `load_engine`)."""
        return argparse.Namespace(checkpoint=[self.path], engine=self.engine, precision=self.precision, device=device,
                                  beam=None, alpha=None, batch_tokens=None, rerank_with=None, rerank_weight=None)


def load_model(spec: ModelSpec, device: torch.device) -> ServedModel:
    """Load one model as the decoding commands load it.

    Raises:
        CheckpointError: a checkpoint or export that cannot be loaded (the message names it).
    """
    engine, config, decode = load_engine(spec.arguments(str(device)), device)
    name = spec.name or f"{config.data.src_lang}-{config.data.tgt_lang}"
    return ServedModel(name, engine, config, decode, spec.path)


def model_specs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[ModelSpec]:
    """The models that --model / --checkpoint name, with their --engine and --precision (usage errors otherwise)."""
    if (args.model is None) == (args.checkpoint is None):
        parser.error("give the models to serve: --model NAME=CKPT (repeatable) or one --checkpoint CKPT")
    named: list[tuple[str | None, str]] = [(None, args.checkpoint)] if args.checkpoint is not None else []
    for value in args.model or []:
        name, _, path = value.partition("=")
        if not path or not NAME.fullmatch(name):
            parser.error(f"--model {value!r}: expected NAME=CKPT, NAME made of letters, digits, '.', '_' and '-'")
        if any(name == other for other, _ in named):
            parser.error(f"--model {name} is given twice")
        named.append((name, path))
    names = [name for name, _ in named]
    engines = _per_model(parser, "--engine", args.engine, names, ENGINES)
    precisions = _per_model(parser, "--precision", args.precision, names, PRECISIONS)
    return [ModelSpec(name, path, engines.get(name, "torch"), precisions.get(name)) for name, path in named]


def _per_model(
    parser: argparse.ArgumentParser, option: str, values: list[str] | None, names: list[str | None],
    choices: Sequence[str],
) -> dict[str | None, str]:
    """{model name: value} from an option given as VALUE (every model not named otherwise; the last
    one counts) or NAME=VALUE (that model)."""
    every: str | None = None
    named: dict[str | None, str] = {}
    for value in values or []:
        name, _, choice = value.rpartition("=")
        if choice not in choices:
            parser.error(f"{option} {value!r}: expected one of {', '.join(choices)}, or NAME=that")
        if not name:
            every = choice
        elif name not in names:
            parser.error(f"{option} {value!r}: no --model named {name!r}")
        else:
            named[name] = choice
    return {name: named.get(name, every) for name in names if named.get(name, every) is not None}


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is this machine's loopback."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        return False


def serve_with_models_on_main_thread(http, batcher: Batcher, sock: socket.socket) -> None:
    """Run uvicorn's `http` server on a second thread and `batcher`'s worker (every model call) on
    this one, the main thread, until the server stops.

    Under load the models decode faster on the main thread than on a second one (docs/serve.md),
    and their large blocks come from glibc's main arena, which `runtime.keep_freed_memory` keeps
    at its peak as it does for the commands; another thread's arena would map them afresh at every
    batch.
    Ctrl+C and SIGTERM stop the server as uvicorn stops it on its own: requests in flight are
    answered, the batcher stops, and then the signal takes its usual effect (KeyboardInterrupt for
    Ctrl+C); a second Ctrl+C stops it without waiting.

    Args:
        http: a `uvicorn.Server` of an application whose `Server` was built with `model_thread=False`.
        batcher: that `Server`'s batcher.
        sock: the listening socket.
    """
    received: list[int] = []

    def on_signal(number: int, frame) -> None:
        received.append(number)
        http.handle_exit(number, frame)

    def serve() -> None:
        try:
            http.run(sockets=[sock])
        finally:  # the worker below returns, also when the server could not start
            batcher.close()

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=serve, name="http")
    try:
        thread.start()
        try:
            batcher.run()
        finally:  # the server stops too, whatever ended the worker (an error here would leave it serving)
            http.should_exit = True
        thread.join()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    for number in reversed(received):
        signal.raise_signal(number)


def _parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="transformer-serve", description="Serve translation models over HTTP: a JSON API, a page that shows "
        "the model at work, and Prometheus metrics (docs/serve.md).")
    parser.add_argument("--model", action="append", metavar="NAME=CKPT",
                        help="a model to serve under NAME (repeatable; the first is the default); CKPT is a checkpoint, "
                             "or with --engine ctranslate2 an exported folder")
    parser.add_argument("--checkpoint", metavar="CKPT", help="serve this one model, named after its language pair")
    parser.add_argument("--engine", action="append", metavar="[NAME=]ENGINE",
                        help="torch or ctranslate2, for every model or for model NAME (default: torch)")
    parser.add_argument("--precision", action="append", metavar="[NAME=]PRECISION",
                        help="fp32, bf16, int8 or auto, for every model or for model NAME, as transformer-translate "
                             "takes it (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; the server has no "
                             "authentication)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--max-texts", type=int, default=defaults.max_texts,
                        help=f"texts per /translate request (default: {defaults.max_texts})")
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars,
                        help=f"characters per text (default: {defaults.max_chars})")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight,
                        help=f"requests waiting for the models at once; more get 503 (default: {defaults.max_in_flight})")
    parser.add_argument("--max-beam", type=int, default=defaults.max_beam,
                        help=f"largest beam a request may ask for (default: {defaults.max_beam})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_seconds,
                        help=f"seconds a client has to send its request body; 408 after (default: {defaults.body_seconds:g})")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="milliseconds a batch waits for more requests to join, what a lone request waits "
                             "(default: 5); after a long batch the wait grows with its time (docs/serve.md)")
    parser.add_argument("--threads", type=int,
                        help="threads each model call may use (default: PyTorch's, one per core)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-serve`."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:  # the serve extra
        import uvicorn

        from transformer.serve.app import create_app
    except ImportError as e:
        sys.exit(f"error: transformer-serve needs the serve extra ({e.name} is missing): pip install 'transformer[serve]'")
    specs = model_specs(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, not {args.port}")
    if not (args.max_wait_ms >= 0 and args.max_wait_ms <= 1000):
        parser.error("--max-wait-ms must be from 0 to 1000")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_in_flight=args.max_in_flight,
                    max_beam=args.max_beam, body_seconds=args.body_timeout)
    if problems := limits.errors():
        parser.error(f"--{problems[0].replace('body_seconds', 'body_timeout').replace('_', '-')}")
    try:
        models = [load_model(spec, prepare(parser, spec.arguments(args.device))) for spec in specs]
        if len({model.name for model in models}) < len(models):
            raise CheckpointError(f"two models would be named {models[0].name}: name them with --model NAME=CKPT")
        sock = listening_socket(args.host, args.port)
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    if not is_loopback(args.host):
        logger.warning("listening on %s: other machines can reach this server, which has no authentication; keep "
                       "the default --host 127.0.0.1 unless a proxy in front of it controls access", args.host)
    app = create_app(models, limits, args.max_wait_ms / 1000.0, model_thread=False)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    for model in models:
        logger.info("model %s: %s -> %s, %s, %s, from %s", model.name, model.config.data.src_lang,
                    model.config.data.tgt_lang, model.decode.engine, model.decode.precision, model.source)
    logger.info("serving on http://%s:%d/ (Ctrl+C stops)", shown, port)
    config = uvicorn.Config(app, log_config=None, access_log=args.access_log, timeout_keep_alive=5,
                            timeout_graceful_shutdown=10)
    try:
        serve_with_models_on_main_thread(uvicorn.Server(config), app.state.server.batcher, sock)
    except KeyboardInterrupt:  # raised once the server has stopped gracefully
        sys.exit(130)


if __name__ == "__main__":
    main()
