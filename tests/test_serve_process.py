"""A real `transformer-serve` process on a free port of 127.0.0.1: every endpoint by content, raw HTTP
that no client library would send, a slow client, the metrics, the curl examples of docs/serve.md, a
short load test (scripts/load_test_serve.py's clients), a clean stop on Ctrl+C, and the command line's
usage errors."""

import asyncio
import importlib.util
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from helpers import ROOT, TIMEOUT, metric_values, one_line_error, process_state_kept, serving

from transformer.commands import serve as serve_command
from transformer.commands import translate as translate_command
from transformer.commands.serve import is_loopback
from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decoding.engine import best

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def served_metrics(url: str) -> dict[tuple[str, tuple], float]:
    return metric_values(httpx.get(url + "metrics", timeout=TIMEOUT).text)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "step_1.pt"


@pytest.fixture(scope="module")
def sentences(tiny_run) -> list[str]:
    return [line for split in ("test", "valid") for line in (tiny_run / "data" / f"{split}.de").read_text().splitlines()]


@pytest.fixture(scope="module")
def expected(checkpoint, sentences, tmp_path_factory) -> list[str]:
    """`transformer-translate`'s lines for `sentences` (its entry point, in this process)."""
    path = tmp_path_factory.mktemp("cli") / "input.de"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stdout, sys.stdout = sys.stdout, out
    try:
        with process_state_kept():
            translate_command.main(["--checkpoint", str(checkpoint), "--input", str(path)])
    finally:
        sys.stdout = stdout
    out.flush()
    return out.buffer.getvalue().decode("utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def server(checkpoint, tiny_ctranslate2, tmp_path_factory):
    """The server: the tiny model (de-en, the default) and its CTranslate2 export (ct2)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--model", f"de-en={checkpoint}", "--model", f"ct2={tiny_ctranslate2}", "--engine", "ct2=ctranslate2",
            "--body-timeout", "1", "--max-wait-ms", "20", "--threads", "1"]
    with serving(args, log) as url:
        yield url, log
    text = log.read_text(encoding="utf-8")  # stopped by Ctrl+C (SIGINT): gracefully, without a traceback
    assert "Traceback" not in text and "Shutting down" in text and "Finished server process" in text


def raw(url: str, request: bytes, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """Send `request` as it is over a new connection; the status and body of the answer."""
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def test_every_endpoint_answers_by_content(server, sentences, expected, checkpoint):
    url, log = server
    assert f"serving on {url}" in log.read_text() and url.startswith("http://127.0.0.1:")
    assert httpx.get(url + "health").json() == {"status": "ok", "models": ["de-en", "ct2"]}
    models = httpx.get(url + "models").json()
    assert [m["name"] for m in models["models"]] == ["de-en", "ct2"] and models["default"] == "de-en"
    assert [m["engine"] for m in models["models"]] == ["torch", "ctranslate2"]
    translated = httpx.post(url + "translate", json={"text": sentences}, timeout=TIMEOUT).json()
    assert translated["translations"] == expected
    singles = [httpx.post(url + "translate", json={"text": s}).json()["translations"][0] for s in sentences]
    assert singles == expected
    attention = httpx.post(url + "attention", json={"text": sentences[0]}).json()
    assert attention["translation"] == expected[0]
    from transformer.checkpoint import load_model

    loaded = load_model([checkpoint])
    source = loaded.src_tokenizer.encode(sentences[0]) + [EOS_ID]
    target = [BOS_ID] + loaded.tgt_tokenizer.encode(expected[0])
    assert attention["target_pieces"] == [loaded.tgt_tokenizer.id_to_piece(i) for i in target]
    maps = loaded.model.attention_maps(torch.tensor([source]), torch.tensor([target]))
    for kind in ("encoder", "decoder", "cross"):
        torch.testing.assert_close(torch.tensor(attention["attention"][kind], dtype=torch.float64),
                                   torch.stack([w[0] for w in maps[kind]]).double(), atol=5.1e-7, rtol=0)
    work = httpx.post(url + "work", json={"text": sentences[0]}).json()
    assert work["translation"] == expected[0] and work["flops"] > 0 and work["steps"] >= 1
    assert httpx.post(url + "attention", json={"text": sentences[0], "model": "ct2"}).status_code == 422
    page = httpx.get(url)
    assert page.status_code == 200 and "/app.js" in page.text
    assert "transformer_serve_requests_total" in httpx.get(url + "metrics").text


RAW_BAD = [  # (request, status, what the message says)
    (post("/translate", b'{"text": "ein \xc3\x28 mann"}'), 400, "not valid UTF-8"),
    (post("/translate", b'{"text": "ein mann' + b" und" * 1000 + b"}"), 400, "not valid JSON"),
    (post("/translate", json.dumps({"text": "ein mann " * 111_112}).encode()), 413, "more than the 2000"),
    (post("/translate", b"x" * 2_000_000), 413, "more than the 1048576 bytes allowed"),
    (b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
     + b"".join(b"100000\r\n" + b"y" * 0x100000 + b"\r\n" for _ in range(2)) + b"0\r\n\r\n", 413, "bytes allowed"),
    (b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 50000000\r\n"
     b"Connection: close\r\n\r\n", 413, "50000000 bytes, more than the 1048576 bytes allowed"),
    (post("/translate", b'{"text": "ein mann", "model": "nope"}'), 404, 'no model named "nope"'),
    (post("/translate", b'{"text": "ein mann", "alpha": NaN}'), 422, "finite number"),
    (post("/translate", b'{"text": "ein mann", "beam": 99999}'), 422, '"beam" must be from 1 to 16'),
    (post("/nope", b"{}"), 404, "no such page"),
]


@pytest.mark.parametrize("request_, status, message", RAW_BAD, ids=[m for _, _, m in RAW_BAD])
def test_raw_bad_requests_get_a_one_line_error_and_the_server_keeps_serving(server, request_, status, message):
    url, _ = server
    got, body = raw(url, request_)
    assert got == status, body[:300]
    error = json.loads(body)["error"]
    assert message in error and "\n" not in error
    assert httpx.post(url + "translate", json={"text": "ein mann"}).status_code == 200


def test_a_slow_client_does_not_hold_the_model(server):
    """A client that sends half its body and stops: other requests are answered meanwhile, and it
    gets 408 when its time is up (--body-timeout 1)."""
    url, _ = server
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    body = json.dumps({"text": "ein mann spielt"}).encode()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as slow:
        slow.sendall(post("/translate", body)[: -len(body) // 2])
        start = time.monotonic()
        for _ in range(3):
            assert httpx.post(url + "translate", json={"text": "ein hund"}, timeout=TIMEOUT).status_code == 200
        assert time.monotonic() - start < 5
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 seconds" in answer


def test_metrics_rise_by_exactly_what_was_sent(server, sentences):
    url, _ = server
    before = served_metrics(url)
    good = [sentences[:2], sentences[2:3], sentences[3:7]]
    for texts in good:
        assert httpx.post(url + "translate", json={"text": texts}).status_code == 200
    for bad in (b"{", b'{"text": 3}', b'{"text": "x", "beam": 0}'):
        assert httpx.post(url + "translate", content=bad).status_code >= 400
    after = served_metrics(url)

    def rise(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert rise("transformer_serve_requests_total", endpoint="/translate", status="200") == 3
    assert rise("transformer_serve_requests_total", endpoint="/translate", status="400") == 1
    assert rise("transformer_serve_requests_total", endpoint="/translate", status="422") == 2
    assert sum(v for (name, labels), v in after.items() if name == "transformer_serve_errors_total") - sum(
        v for (name, labels), v in before.items() if name == "transformer_serve_errors_total") == 3
    assert rise("transformer_serve_sentences_total", model="de-en") == 7
    assert rise("transformer_serve_request_seconds_count", endpoint="/translate") == 6
    assert rise("transformer_serve_batch_sentences_sum", model="de-en") == 7


def test_a_short_load_gets_every_answer_right_in_batches(server, sentences, expected):
    """scripts/load_test_serve.py's clients, briefly: 24 clients for 2 s; no errors, every answer the
    single-request one, and batches of several requests formed."""
    url, _ = server
    load_test = load_script("load_test_serve")
    before = served_metrics(url)
    figures = asyncio.run(load_test.concurrent(url, sentences, expected, clients=24, seconds=2.0))
    batches = load_test.batches_formed(before, served_metrics(url))
    assert figures.errors == 0 and figures.mismatches == 0 and figures.sentences >= 24
    assert batches["mean_sentences"] > 1.5, batches
    assert figures.percentile(50) <= figures.percentile(99)


def test_the_curl_examples_of_docs_serve_run(server):
    url, _ = server
    text = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]
    assert len(commands) >= 6
    for command in commands:
        words = [w.replace("http://127.0.0.1:8000/", url) for w in shlex.split(command)]
        done = subprocess.run(words, capture_output=True, timeout=TIMEOUT)
        assert done.returncode == 0, (command, done.stderr)
        if "/metrics" in command:
            assert b"transformer_serve_requests_total" in done.stdout
            continue
        answer = json.loads(done.stdout)
        if '"text": ""' in command:
            assert "error" in answer, command
        else:
            assert "error" not in answer, (command, answer)


@pytest.mark.usefixtures("restore_process_state")
@pytest.mark.parametrize("number, status", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_signal_stops_the_server_gracefully_then_takes_its_usual_effect(checkpoint, tmp_path, number, status):
    """The models run on the main thread and uvicorn on another, which installs no signal handlers:
    the command's own stop the server as uvicorn would (shutdown logged, no traceback), then Ctrl+C
    exits with 130 and SIGTERM ends the process as the signal does."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "transformer.commands.serve", "--checkpoint", str(checkpoint),
                                    "--threads", "1", "--port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (listening := re.search(r"serving on (http://\S+/)", log.read_text(encoding="utf-8"))):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(encoding="utf-8")
            time.sleep(0.05)
        answer = httpx.post(listening.group(1) + "translate", json={"text": "ein mann"}, timeout=TIMEOUT)
        assert answer.status_code == 200
        process.send_signal(number)
        assert process.wait(TIMEOUT) == status
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text(encoding="utf-8")
    assert "Traceback" not in text and "Shutting down" in text and "Finished server process" in text


def test_usage_errors_are_one_line_before_anything_loads(checkpoint, capsys):
    for args, message in (
        ([], "give the models to serve"),
        (["--model", "nameonly"], "expected NAME=CKPT"),
        (["--model", f"a={checkpoint}", "--model", f"a={checkpoint}"], "--model a is given twice"),
        (["--model", f"a={checkpoint}", "--precision", "b=int8"], "no --model named 'b'"),
        (["--checkpoint", str(checkpoint), "--engine", "tensorflow"], "expected one of torch, ctranslate2"),
        (["--checkpoint", str(checkpoint), "--max-texts", "0"], "--max-texts must be >= 1"),
        (["--checkpoint", str(checkpoint), "--threads", "0"], "--threads must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit:
            serve_command.main(args)
        assert exit.value.code == 2 and message in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as exit:
        serve_command.main(["--checkpoint", "no/such.pt", "--port", "0"])
    assert one_line_error(exit, "error: ", "no/such.pt")


def test_an_address_other_than_loopback_is_told_apart():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("no-such-host.invalid")


def test_the_same_translation_from_the_python_api(checkpoint, sentences, expected):
    """What the server answers is what `Engine.translate` gives, the path every command takes."""
    from transformer.commands.serve import ModelSpec, load_model

    served = load_model(ModelSpec(None, str(checkpoint)), torch.device("cpu"))
    assert served.name == "de-en"
    assert best(served.engine.translate(sentences, served.decode)) == expected
