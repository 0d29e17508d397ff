"""The server's requests: the limits it keeps, and JSON bodies checked into typed requests.

Every problem is a `RequestError` with an HTTP status and one line that names the field at fault:
400 for a body that is not UTF-8 JSON, 413 for what is over a size limit, 422 for a field of the
wrong type or out of range. Nothing the client sends reaches a model unchecked.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any


class RequestError(Exception):
    """A request the server refuses: `status` and a one-line `message` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait for the models at once."""

    max_texts: int = 64  # texts in one /translate request (413 above)
    max_chars: int = 2000  # characters in one text (413 above)
    max_body_bytes: int = 1 << 20  # request body (413 above)
    max_in_flight: int = 256  # requests waiting for or being decoded at once (503 above)
    max_beam: int = 16  # largest beam a request may ask for (422 above)
    max_alpha: float = 10.0  # largest length penalty a request may ask for (422 above)
    max_attention_pieces: int = 100  # source or target pieces an /attention or /work answer may hold (413 above)
    body_seconds: float = 10.0  # time a client has to send its request body (408 after)

    def errors(self) -> list[str]:
        """What is out of range, one message per problem; empty when valid."""
        sizes = {"max_texts": self.max_texts, "max_chars": self.max_chars, "max_body_bytes": self.max_body_bytes,
                 "max_in_flight": self.max_in_flight, "max_beam": self.max_beam}
        problems = [f"{name} must be >= 1, got {value}" for name, value in sizes.items() if value < 1]
        if self.max_attention_pieces < 2:
            problems.append("max_attention_pieces must be >= 2 (a piece and EOS)")
        if not (math.isfinite(self.max_alpha) and self.max_alpha >= 0):
            problems.append(f"max_alpha must be a finite number >= 0, got {self.max_alpha}")
        if not (math.isfinite(self.body_seconds) and self.body_seconds > 0):
            problems.append(f"body_seconds must be a finite number > 0, got {self.body_seconds}")
        return problems


@dataclass(frozen=True)
class TranslateRequest:
    """A checked `POST /translate` body.

    Attributes:
        texts: the texts, stripped as `transformer-translate` strips its lines.
        model: the model's name, or None for the server's default.
        beam, n_best, alpha: settings given (None: the model's).
    """

    texts: list[str]
    model: str | None = None
    beam: int | None = None
    n_best: int | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class TextRequest:
    """A checked `POST /attention` or `POST /work` body: one text and, optionally, a model."""

    text: str
    model: str | None = None


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body.

    Raises:
        RequestError: 400 for a body that is not UTF-8, not JSON or not an object.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the request body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset "
                                f"{e.start}") from None
    try:
        value = json.loads(text, parse_constant=float)  # NaN and Infinity become floats, refused by the checks
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting too deep
        raise RequestError(400, f"the request body is not valid JSON here: {str(e)[:120]}") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {_kind(value)}")
    return value


def translate_request(body: bytes, limits: Limits) -> TranslateRequest:
    """Check a `POST /translate` body: {"text": str | [str], "model"?, "beam"?, "n_best"?, "alpha"?}.

    Raises:
        RequestError: naming the field at fault.
    """
    fields = parse_object(body)
    _known(fields, ("text", "model", "beam", "n_best", "alpha"))
    if "text" not in fields:
        raise RequestError(422, 'missing field "text": a string or a list of strings')
    texts = fields["text"]
    if isinstance(texts, str):
        texts = [_text(texts, "text", limits)]
    elif isinstance(texts, list):
        if not texts:
            raise RequestError(422, '"text" is an empty list: give at least one text')
        if len(texts) > limits.max_texts:
            raise RequestError(413, f'"text" holds {len(texts)} texts, more than the {limits.max_texts} a request may hold')
        texts = [_text(t, f"text[{i}]", limits) for i, t in enumerate(texts)]
    else:
        raise RequestError(422, f'"text" must be a string or a list of strings, not {_kind(texts)}')
    beam = _integer(fields, "beam", 1, limits.max_beam)
    n_best = _integer(fields, "n_best", 1, limits.max_beam)
    if beam is not None and n_best is not None and n_best > beam:
        raise RequestError(422, f'"n_best" ({n_best}) cannot be more than "beam" ({beam})')
    alpha = fields.get("alpha")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise RequestError(422, f'"alpha" must be a number, not {_kind(alpha)}')
        if not (math.isfinite(alpha) and 0 <= alpha <= limits.max_alpha):
            raise RequestError(422, f'"alpha" must be a finite number from 0 to {limits.max_alpha:g}, not {alpha!r}')
        alpha = float(alpha)
    return TranslateRequest(texts, _model(fields), beam, n_best, alpha)


def text_request(body: bytes, limits: Limits) -> TextRequest:
    """Check a `POST /attention` or `POST /work` body: {"text": str, "model"?}.

    Raises:
        RequestError: naming the field at fault.
    """
    fields = parse_object(body)
    _known(fields, ("text", "model"))
    if "text" not in fields:
        raise RequestError(422, 'missing field "text": a string')
    return TextRequest(_text(fields["text"], "text", limits), _model(fields))


def _text(value: Any, name: str, limits: Limits) -> str:
    """One text, checked and stripped."""
    if not isinstance(value, str):
        raise RequestError(422, f'"{name}" must be a string, not {_kind(value)}')
    if len(value) > limits.max_chars:
        raise RequestError(413, f'"{name}" has {len(value)} characters, more than the {limits.max_chars} a text may have')
    surrogate = next((i for i, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
    if surrogate is not None:  # a lone \\ud800 escape: JSON allows it, UTF-8 cannot hold it
        raise RequestError(422, f'"{name}" holds an unpaired surrogate (U+{ord(value[surrogate]):04X}) at character '
                                f'{surrogate}, which is not text')
    value = value.strip()
    if not value:
        raise RequestError(422, f'"{name}" is empty: give a sentence to translate')
    return value


def _integer(fields: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An optional integer field within [low, high]."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, f'"{name}" must be an integer, not {_kind(value)}')
    if not low <= value <= high:
        shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:20]}..."
        raise RequestError(422, f'"{name}" must be from {low} to {high}, not {shown}')
    return value


def _model(fields: dict[str, Any]) -> str | None:
    """The optional model name."""
    value = fields.get("model")
    if value is not None and not isinstance(value, str):
        raise RequestError(422, f'"model" must be a string, not {_kind(value)}')
    return value


def _known(fields: dict[str, Any], names: tuple[str, ...]) -> None:
    """Refuse a field the request does not have, suggesting the nearest one (a typo is not ignored)."""
    for name in fields:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else f"; the fields are {', '.join(names)}"
            raise RequestError(422, f'unknown field "{name[:40]}"{hint}')


def _kind(value: Any) -> str:
    """The JSON kind of a value, for messages."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
