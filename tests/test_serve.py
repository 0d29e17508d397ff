"""The server's JSON API in-process (Starlette's test client; httpx over ASGI for concurrent requests):
every endpoint by content, translations equal to `transformer-translate`'s, attention equal to
`Transformer.attention_maps`, bad input refused with one line, the limits, the batcher, the metrics."""

import asyncio
import dataclasses
import io
import json
import re
import sys
import threading

import httpx
import pytest
import torch
from helpers import TIMEOUT, metric_values
from starlette.testclient import TestClient

from transformer.commands import translate as translate_command
from transformer.commands.serve import ModelSpec, load_model
from transformer.data.tokenizer import BOS_ID
from transformer.decoding.engine import best
from transformer.decoding.flops import decoding_flops
from transformer.serve.app import create_app
from transformer.serve.requests import Limits

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = ["ein mann spielt im park mit einem ball", "der hund läuft schnell", "ein kind", "frau"]


def cli_lines(*args: str) -> list[str]:
    """What `transformer-translate ARGS` writes, one line per input line (run in this process)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stdout, sys.stdout = sys.stdout, out
    try:
        translate_command.main(list(args))
    finally:
        sys.stdout = stdout
    out.flush()
    return out.buffer.getvalue().decode("utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "step_1.pt"


@pytest.fixture(scope="module")
def sentences(tiny_run) -> list[str]:
    lines = [line for split in ("test", "valid") for line in (tiny_run / "data" / f"{split}.de").read_text().splitlines()]
    return lines + EXTRA


@pytest.fixture(scope="module")
def input_file(sentences, tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "input.de"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return load_model(ModelSpec("tiny", str(checkpoint)), torch.device("cpu"))


@pytest.fixture(scope="module")
def ct2(tiny_ctranslate2):
    return load_model(ModelSpec("ct2", str(tiny_ctranslate2), engine="ctranslate2"), torch.device("cpu"))


@pytest.fixture(scope="module")
def client(tiny, ct2):
    with TestClient(create_app([tiny, ct2])) as test_client:
        yield test_client


def test_health_and_models_say_what_is_served(client, tiny, checkpoint):
    assert client.get("/health").json() == {"status": "ok", "models": ["tiny", "ct2"]}
    answer = client.get("/models").json()
    assert answer["default"] == "tiny"
    assert answer["limits"] == dataclasses.asdict(Limits())
    assert answer["limits"]["max_texts"] >= 64 and answer["limits"]["max_chars"] >= 2000
    described = {m["name"]: m for m in answer["models"]}
    saved = torch.load(checkpoint, weights_only=True)
    model = described["tiny"]
    assert model["source_language"] == "de" and model["target_language"] == "en"
    assert model["parameters"] == sum(p.numel() for p in tiny.engine.model.parameters())
    assert model["vocabulary"] == {"source": 100, "target": 100}
    assert (model["engine"], model["precision"], model["attention"]) == ("torch", "fp32", True)
    assert (model["layers"], model["heads"]) == ({"encoder": 1, "decoder": 1}, 2)
    assert {k: model["decode"][k] for k in saved["config"]["decode"]} == saved["config"]["decode"]
    assert model["decode"]["beam_size"] == 2 and model["decode"]["max_len_b"] == 4
    exported = described["ct2"]
    assert (exported["engine"], exported["attention"]) == ("ctranslate2", False)
    assert exported["decode"]["length_penalty_form"] == "length"
    assert exported["parameters"] == model["parameters"]


def test_translations_equal_transformer_translates_lines(client, sentences, input_file, checkpoint):
    expected = cli_lines("--checkpoint", str(checkpoint), "--input", str(input_file))
    assert len(expected) == len(sentences) and any(expected)
    together = client.post("/translate", json={"text": sentences}).json()
    assert together["model"] == "tiny" and together["translations"] == expected
    assert "n_best" not in together
    timings = together["timings"]
    assert timings["batch_sentences"] == len(sentences)
    assert 0 <= timings["queue_ms"] and 0 < timings["decode_ms"] <= timings["total_ms"]
    one_by_one = [client.post("/translate", json={"text": s}).json()["translations"] for s in sentences]
    assert one_by_one == [[line] for line in expected]


def test_the_requests_settings_are_the_commands_options(client, tiny, sentences, input_file, checkpoint):
    expected = cli_lines("--checkpoint", str(checkpoint), "--input", str(input_file), "--beam", "3", "--alpha", "1.5")
    answer = client.post("/translate", json={"text": sentences, "beam": 3, "alpha": 1.5, "n_best": 3}).json()
    assert answer["translations"] == expected
    settings = dataclasses.replace(tiny.decode, beam_size=3, length_penalty=1.5, n_best=3)
    reference = tiny.engine.translate(sentences, settings)
    assert answer["n_best"] == [[{"text": c.text, "score": c.score} for c in found] for found in reference]
    assert all(1 <= len(found) <= 3 for found in answer["n_best"])
    greedy = client.post("/translate", json={"text": sentences[:3], "beam": 1, "n_best": 1}).json()
    assert greedy["translations"] == cli_lines("--checkpoint", str(checkpoint), "--input", str(input_file),
                                               "--beam", "1")[:3]
    assert all(found[0]["score"] is None for found in greedy["n_best"])  # greedy search computes no score


def test_a_ctranslate2_model_translates_as_the_command_does_and_has_no_attention(client, sentences, input_file,
                                                                                   tiny_ctranslate2):
    expected = cli_lines("--engine", "ctranslate2", "--checkpoint", str(tiny_ctranslate2), "--input", str(input_file))
    assert client.post("/translate", json={"text": sentences, "model": "ct2"}).json()["translations"] == expected
    for path in ("/attention", "/work"):
        refused = client.post(path, json={"text": sentences[0], "model": "ct2"})
        assert refused.status_code == 422
        assert "CTranslate2" in refused.json()["error"] and "--engine torch" in refused.json()["error"]


def test_attention_equals_attention_maps_of_the_pair(client, tiny, sentences):
    sentence = sentences[0]
    answer = client.post("/attention", json={"text": sentence}).json()
    translation = client.post("/translate", json={"text": sentence}).json()["translations"][0]
    assert answer["model"] == "tiny" and answer["translation"] == translation
    engine, model = tiny.engine, tiny.engine.model
    source = engine.src_tokenizer.encode(sentence) + [3]
    output = engine.search([source], tiny.decode)[0][0].tokens
    target = [BOS_ID] + output
    assert answer["source_pieces"] == [engine.src_tokenizer.id_to_piece(i) for i in source]
    assert answer["target_pieces"] == [engine.tgt_tokenizer.id_to_piece(i) for i in target]
    assert answer["output_pieces"] == answer["target_pieces"][1:] + ["</s>"]
    maps = model.attention_maps(torch.tensor([source]), torch.tensor([target]))
    S, T = len(source), len(target)
    for kind, shape in (("encoder", (S, S)), ("decoder", (T, T)), ("cross", (T, S))):
        sent = torch.tensor(answer["attention"][kind], dtype=torch.float64)
        assert sent.shape == (len(maps[kind]), 2, *shape)
        expected = torch.stack([layer[0] for layer in maps[kind]]).double()
        torch.testing.assert_close(sent, expected, atol=5.1e-7, rtol=0)
        assert torch.allclose(sent.sum(-1), torch.ones(sent.shape[:-1], dtype=torch.float64), atol=1e-5)
    decoder = torch.tensor(answer["attention"]["decoder"])
    assert torch.all(decoder.triu(1) == 0)  # a target position never attends to a later one


def test_work_counts_the_translations_products_and_times_every_part(client, tiny, sentences):
    answer = client.post("/work", json={"text": sentences[1]}).json()
    assert answer["translation"] == client.post("/translate", json={"text": sentences[1]}).json()["translations"][0]
    S = len(tiny.engine.src_tokenizer.encode(sentences[1])) + 1
    assert (answer["source_pieces"], answer["beam"], answer["use_cache"]) == (S, 2, True)
    counted = decoding_flops(tiny.shape, S, answer["steps"], 2)
    rows = {(c["side"], c["component"]): c for c in answer["components"]}
    assert {key: rows[key]["flops"] for key in counted} == counted
    assert answer["flops"] == sum(counted.values())
    assert answer["flops_without_cache"] == sum(decoding_flops(tiny.shape, S, answer["steps"], 2, False).values())
    assert answer["flops_without_cache"] > answer["flops"]
    assert set(rows) == {(side, part) for side in ("encoder", "decoder")
                         for part in ("embedding", "projections", "attention", "feed_forward", "other")} | {
        ("search", "search")}
    assert all(c["ms"] > 0 for c in answer["components"] if c["flops"] > 0 or c["side"] == "search")
    assert 0 < answer["ms"] <= answer["wall_ms"]


BAD = [  # (path, raw body, status, what the message says)
    ("/translate", b"{not json", 400, "not valid JSON"),
    ("/translate", b'["ein mann"]', 400, "must be a JSON object"),
    ("/translate", b'{"text": "ein \xff mann"}', 400, "not valid UTF-8: byte 0xff"),
    ("/translate", b"[" * 100_000, 400, "not valid JSON"),
    ("/translate", b'{"beam": 2}', 422, 'missing field "text"'),
    ("/translate", b'{"text": 5}', 422, '"text" must be a string or a list of strings'),
    ("/translate", b'{"text": ["ein mann", 5]}', 422, '"text[1]" must be a string, not an integer'),
    ("/translate", b'{"text": ""}', 422, '"text" is empty'),
    ("/translate", b'{"text": ["ein mann", "  "]}', 422, '"text[1]" is empty'),
    ("/translate", b'{"text": []}', 422, "empty list"),
    ("/translate", b'{"text": "\\ud800 mann"}', 422, "unpaired surrogate"),
    ("/translate", b'{"text": "ein mann", "model": "nope"}', 404, 'no model named "nope"'),
    ("/translate", b'{"text": "ein mann", "model": 3}', 422, '"model" must be a string'),
    ("/translate", b'{"text": "ein mann", "beam": 0}', 422, '"beam" must be from 1 to 16'),
    ("/translate", b'{"text": "ein mann", "beam": 17}', 422, '"beam" must be from 1 to 16'),
    ("/translate", b'{"text": "ein mann", "beam": 1000000000000000000000000000000}', 422, '"beam" must be from'),
    ("/translate", b'{"text": "ein mann", "beam": "4"}', 422, '"beam" must be an integer, not a string'),
    ("/translate", b'{"text": "ein mann", "beam": 2.5}', 422, '"beam" must be an integer, not a number'),
    ("/translate", b'{"text": "ein mann", "beam": true}', 422, '"beam" must be an integer, not a boolean'),
    ("/translate", b'{"text": "ein mann", "alpha": NaN}', 422, '"alpha" must be a finite number'),
    ("/translate", b'{"text": "ein mann", "alpha": Infinity}', 422, '"alpha" must be a finite number'),
    ("/translate", b'{"text": "ein mann", "alpha": 1e999}', 422, '"alpha" must be a finite number'),
    ("/translate", b'{"text": "ein mann", "alpha": -0.5}', 422, '"alpha" must be a finite number from 0 to 10'),
    ("/translate", b'{"text": "ein mann", "alpha": "big"}', 422, '"alpha" must be a number'),
    ("/translate", b'{"text": "ein mann", "beam": 2, "n_best": 3}', 422, '"n_best" (3) cannot be more than "beam"'),
    ("/translate", b'{"text": "ein mann", "n_best": 3}', 422, '"n_best" (3) cannot be more than the beam (2)'),
    ("/translate", b'{"text": "ein mann", "beams": 3}', 422, 'unknown field "beams" (did you mean "beam"?)'),
    ("/translate", json.dumps({"text": ["ein mann"] * 65}).encode(), 413, "65 texts, more than the 64"),
    ("/translate", json.dumps({"text": "a" * 2001}).encode(), 413, "2001 characters, more than the 2000"),
    ("/translate", json.dumps({"text": "ein mann " * 111_112}).encode(), 413, "more than the 2000"),  # 1 MB
    ("/translate", json.dumps({"text": "x" * 1_100_000}).encode(), 413, "more than the 1048576 bytes allowed"),
    ("/attention", b'{"text": ""}', 422, '"text" is empty'),
    ("/attention", b'{"text": ["ein mann"]}', 422, '"text" must be a string, not a list'),
    ("/attention", b'{"text": "ein mann", "beam": 2}', 422, 'unknown field "beam"'),
    ("/attention", json.dumps({"text": " ".join(["mann"] * 120)}).encode(), 413, "more than the 100"),
    ("/work", b'{"text": "ein mann", "model": "nope"}', 404, 'no model named "nope"'),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{p}:{m[:30]}" for p, _, _, m in BAD])
def test_bad_input_gets_a_one_line_error_and_the_next_request_is_served(client, path, body, status, message):
    refused = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error and len(error) < 300
    assert client.post("/translate", json={"text": "ein mann"}).status_code == 200


def test_unknown_pages_and_methods_are_json_errors_and_no_api_page_loads_from_elsewhere(client):
    for path in ("/nope", "/docs", "/openapi.json", "/redoc"):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.json()["error"].startswith("no such page")
    wrong = client.get("/translate")
    assert wrong.status_code == 405 and "use POST" in wrong.json()["error"]


def test_the_page_loads_only_its_own_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    html = page.text
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["data:,", "/style.css", "/app.js"]
    for path in ("/", "/app.js", "/style.css"):
        text = client.get(path).text
        assert not re.search(r"https?:|//[a-z0-9]", text.replace("http-equiv", "")), f"{path} names another site"
    script = client.get("/app.js").text
    assert set(re.findall(r'api\("(/[a-z]+)"', script)) == {"/models", "/translate", "/attention", "/work"}
    for label in ('for="source"', 'for="kind"', 'for="layer"', 'for="head"', 'for="model"'):
        assert label in html


def test_metrics_count_exactly_the_requests_sentences_tokens_and_errors(client, tiny, sentences):
    before = metric_values(client.get("/metrics").text)
    batches = [sentences[:1], sentences[1:3], sentences[3:6]]
    for texts in batches:
        assert client.post("/translate", json={"text": texts}).status_code == 200
    assert client.post("/translate", json={"text": ""}).status_code == 422
    assert client.post("/translate", content=b"{").status_code == 400
    assert client.post("/attention", json={"text": sentences[0]}).status_code == 200
    after = metric_values(client.get("/metrics").text)

    def rise(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    texts = [t for batch in batches for t in batch]
    sources = sum(len(tiny.engine.src_tokenizer.encode(t)) + 1 for t in texts)
    targets = sum(len(found[0].tokens) for found in tiny.engine.search(
        [tiny.engine.src_tokenizer.encode(t) + [3] for t in texts], tiny.decode))
    assert rise("transformer_serve_requests_total", endpoint="/translate", status="200") == 3
    assert rise("transformer_serve_requests_total", endpoint="/translate", status="422") == 1
    assert rise("transformer_serve_requests_total", endpoint="/translate", status="400") == 1
    assert rise("transformer_serve_requests_total", endpoint="/attention", status="200") == 1
    assert rise("transformer_serve_errors_total", endpoint="/translate", status="422") == 1
    assert rise("transformer_serve_errors_total", endpoint="/translate", status="400") == 1
    assert rise("transformer_serve_sentences_total", model="tiny") == 6
    assert rise("transformer_serve_tokens_total", model="tiny", side="source") == sources
    assert rise("transformer_serve_tokens_total", model="tiny", side="target") == targets
    assert rise("transformer_serve_request_seconds_count", endpoint="/translate") == 5
    assert rise("transformer_serve_batch_sentences_count", model="tiny") == 3
    assert rise("transformer_serve_batch_sentences_sum", model="tiny") == 6
    assert rise("transformer_serve_batch_tokens_sum", model="tiny") == sources
    assert rise("transformer_serve_batch_seconds_count", model="tiny") == 3
    assert 0 < rise("transformer_serve_batch_seconds_sum", model="tiny") < 60
    assert after[("transformer_serve_in_flight", ())] == 0


def run_async(scenario):
    return asyncio.run(asyncio.wait_for(scenario, TIMEOUT))


async def until_in_flight(server, n: int) -> None:
    """Wait until `n` requests wait for the models (each has then handed its work to the batcher)."""
    while server.metrics.registry.get_sample_value("transformer_serve_in_flight") < n:
        await asyncio.sleep(0.01)


def test_concurrent_requests_are_decoded_in_one_batch_by_one_thread(tiny, sentences):
    """Requests that arrive while the model is busy wait, and are then decoded together, on the one
    thread that runs the model, never two at once; each gets its own answer."""
    app = create_app([tiny], max_wait=0.05)
    server = app.state.server
    calls, running, overlaps = [], [0], []
    search = tiny.engine.search

    def watched(sources, settings):
        running[0] += 1
        overlaps.append(running[0] > 1)
        calls.append((threading.get_ident(), len(sources)))
        try:
            return search(sources, settings)
        finally:
            running[0] -= 1

    async def scenario():
        gate = threading.Event()
        busy = asyncio.ensure_future(server.batcher.call(gate.wait))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as http:
            asked = [asyncio.ensure_future(http.post("/translate", json={"text": s})) for s in sentences]
            await until_in_flight(server, len(sentences))
            gate.set()
            await busy
            return [await a for a in asked]

    alone = [best(tiny.engine.translate([s], tiny.decode))[0] for s in sentences]
    tiny.engine.search = watched
    try:
        answers = run_async(scenario())
    finally:
        del tiny.engine.search
        server.close()
    assert [a.json()["translations"][0] for a in answers] == alone
    assert {a.json()["timings"]["batch_sentences"] for a in answers} == {len(sentences)}
    assert len(calls) == 1 and calls[0][1] == len(sentences) and not any(overlaps)
    assert calls[0][0] != threading.get_ident()


def test_without_a_model_thread_the_thread_that_runs_the_batcher_decodes(tiny, sentences):
    """`model_thread=False`, as `transformer-serve` builds it: every search runs on the thread that
    called `batcher.run()` (there the main thread), which returns once the server closes; a batcher
    with a thread of its own refuses a second worker."""
    app = create_app([tiny], max_wait=0.01, model_thread=False)
    server = app.state.server
    threads = []
    search = tiny.engine.search

    def watched(sources, settings):
        threads.append(threading.get_ident())
        return search(sources, settings)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as http:
            return await asyncio.gather(*(http.post("/translate", json={"text": s}) for s in sentences))

    worker = threading.Thread(target=server.batcher.run, name="worker")
    tiny.engine.search = watched
    worker.start()
    try:
        answers = run_async(scenario())
    finally:
        del tiny.engine.search
        server.close()
        worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert [a.json()["translations"][0] for a in answers] == [best(tiny.engine.translate([s], tiny.decode))[0]
                                                              for s in sentences]
    assert threads and set(threads) == {worker.ident}
    with_thread = create_app([tiny]).state.server
    try:
        with pytest.raises(RuntimeError, match="own thread"):
            with_thread.batcher.run()
    finally:
        with_thread.close()


def test_more_requests_than_the_in_flight_limit_get_503_and_the_rest_are_served(tiny):
    app = create_app([tiny], Limits(max_in_flight=2))
    server = app.state.server

    async def scenario():
        gate = threading.Event()
        busy = asyncio.ensure_future(server.batcher.call(gate.wait))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as http:
            waiting = [asyncio.ensure_future(http.post("/translate", json={"text": "ein mann"})) for _ in range(2)]
            await until_in_flight(server, 2)
            refused = await http.post("/translate", json={"text": "ein mann"})
            gate.set()
            await busy
            served = [await w for w in waiting]
            after = await http.post("/translate", json={"text": "ein mann"})
            return refused, served, after

    try:
        refused, served, after = run_async(scenario())
    finally:
        server.close()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"]
    assert [s.status_code for s in served] == [200, 200] and after.status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408(tiny):
    app = create_app([tiny], Limits(body_seconds=0.2))
    messages = []

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/translate", "raw_path": b"/translate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    try:
        run_async(app(scope, receive, send))
    finally:
        app.state.server.close()
    assert messages[0]["status"] == 408
    assert "did not arrive within 0.2 seconds" in json.loads(messages[1]["body"])["error"]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_and_int8_answers_are_the_commands_for_the_same_batch(precision, checkpoint, sentences, input_file):
    """bf16 and int8 round differently with the shape of a batch (int8 quantizes its activations with
    each batch's range): a request holding the command's lines gets its output exactly, a lone
    sentence what the command gives for that line alone, and, in bf16, scores within 0.01 of the
    whole batch's."""
    model = load_model(ModelSpec(precision, str(checkpoint), precision=precision), torch.device("cpu"))
    expected = cli_lines("--checkpoint", str(checkpoint), "--input", str(input_file), "--precision", precision)
    with TestClient(create_app([model])) as http:
        assert http.post("/translate", json={"text": sentences}).json()["translations"] == expected
        singles = [http.post("/translate", json={"text": s, "n_best": 1}).json()["n_best"][0][0] for s in sentences]
    alone = [model.engine.translate([s], model.decode)[0][0] for s in sentences]
    assert [s["text"] for s in singles] == [c.text for c in alone]
    if precision == "bf16":
        together = [found[0] for found in model.engine.translate(sentences, model.decode)]
        assert max(abs(s["score"] - c.score) for s, c in zip(singles, together)) <= 0.01
