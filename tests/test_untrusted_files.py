"""Files that carry code are refused wherever a checkpoint, a config or an export is read, and the code never runs.

Every entry point that reads such a file is given one whose loading would run a shell command: a
pickle whose `__reduce__` calls `os.system`, in each form `torch.load` reads (its zip format, its
legacy format, a bare pickle), and YAML with a `!!python` tag. Each case asserts that the command
stops with a one-line error naming the file (or the override) and that the file the command would
have created does not exist. The examples read no checkpoint: examples/language_model.py writes the
one `transformer-generate` reads, which is in the table.
"""

import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import yaml

from transformer import train
from transformer.checkpoint import FORMAT
from transformer.commands import attention, average, evaluate, export, generate, translate
from transformer.data import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling it runs `command` in a shell."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def torch_zip(path: Path, state: dict) -> None:
    torch.save(state, path)


def torch_legacy(path: Path, state: dict) -> None:
    torch.save(state, path, _use_new_zipfile_serialization=False)


def bare_pickle(path: Path, state: dict) -> None:
    path.write_bytes(pickle.dumps(state, protocol=2))


PICKLE_FORMS = {"torch zip": torch_zip, "torch legacy": torch_legacy, "bare pickle": bare_pickle}
YAML_TAGS = {
    "os.system": '!!python/object/apply:os.system ["touch {marker}"]',
    "subprocess.call": '!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
}


class Case(NamedTuple):
    """An entry point, given the file `bad` that carries code."""

    main: Callable[[list[str]], None]
    argv: Callable[[Path, Path, dict[str, Path]], list[str]]  # (bad, tmp_path, fixtures) -> arguments
    where: str = "{bad}"  # where `bad` goes: the path the table's file is written to, relative to tmp_path


def step_1(fixtures: dict[str, Path]) -> str:
    return str(fixtures["run"] / "checkpoints" / "step_1.pt")


CHECKPOINT_READERS = {
    "evaluate --checkpoint": Case(evaluate.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad), "--output", str(tmp / "hyp.txt"), "--device", "cpu"]),
    "evaluate, averaging": Case(evaluate.main, lambda bad, tmp, fx: [
        "--checkpoint", step_1(fx), str(bad), "--output", str(tmp / "hyp.txt"), "--device", "cpu"]),
    "evaluate --rerank-with": Case(evaluate.main, lambda bad, tmp, fx: [
        "--checkpoint", step_1(fx), "--rerank-with", str(bad), "--beam", "2", "--output", str(tmp / "hyp.txt"),
        "--device", "cpu"]),
    "translate --checkpoint": Case(translate.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad), "--input", str(fx["run"] / "data" / "test.de"), "--device", "cpu"]),
    "translate --rerank-with": Case(translate.main, lambda bad, tmp, fx: [
        "--checkpoint", step_1(fx), "--rerank-with", str(bad), "--beam", "2",
        "--input", str(fx["run"] / "data" / "test.de"), "--device", "cpu"]),
    "attention --checkpoint": Case(attention.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad), "--sentence", "ein hund", "--output", str(tmp / "a.png"), "--device", "cpu"]),
    "average --inputs": Case(average.main, lambda bad, tmp, fx: [
        "--inputs", step_1(fx), str(bad), "--output", str(tmp / "avg.pt")]),
    "average --run-dir": Case(average.main, lambda bad, tmp, fx: [
        "--run-dir", str(tmp / "run"), "--last", "1", "--output", str(tmp / "avg.pt")],
        where="run/checkpoints/step_3.pt"),
    "export --checkpoint": Case(export.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad), "--format", "hf", "--output", str(tmp / "hf")]),
    "generate": Case(generate.main, lambda bad, tmp, fx: [str(bad), "--prompt", "ein"]),
    "train --resume": Case(train.main, lambda bad, tmp, fx: [
        "--config", str(fx["run"] / "config.yaml"), "--resume", f"train.output_dir={tmp / 'run'}"],
        where="run/checkpoints/step_1.pt"),  # the run's only checkpoint
    "a pickle named .safetensors": Case(evaluate.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad), "--output", str(tmp / "hyp.txt"), "--device", "cpu"], where="bad.safetensors"),
}

CONFIG_READERS = {
    "train --config": Case(train.main, lambda bad, tmp, fx: ["--config", str(bad)], where="bad.yaml"),
    "prepare --config": Case(prepare.main, lambda bad, tmp, fx: ["--config", str(bad)], where="bad.yaml"),
    "evaluate --engine ctranslate2": Case(evaluate.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad.parent), "--engine", "ctranslate2", "--output", str(tmp / "hyp.txt"),
        "--device", "cpu"], where="ct2/training_config.yaml"),
    "translate --engine ctranslate2": Case(translate.main, lambda bad, tmp, fx: [
        "--checkpoint", str(bad.parent), "--engine", "ctranslate2", "--input", str(fx["run"] / "data" / "test.de"),
        "--device", "cpu"], where="ct2/training_config.yaml"),
}

OVERRIDE_READERS = {
    "train KEY=VALUE": Case(train.main, lambda value, tmp, fx: [
        "--config", str(fx["run"] / "config.yaml"), f"train.output_dir={tmp / 'run'}", f"train.seed={value}"]),
    "prepare KEY=VALUE": Case(prepare.main, lambda value, tmp, fx: [
        "--config", str(fx["run"] / "config.yaml"), f"data.prepared_dir={tmp / 'prepared'}", f"data.src_lang={value}"]),
}


@pytest.fixture
def fixtures(tiny_run, tiny_ctranslate2, tmp_path) -> dict[str, Path]:
    """The tiny run, and in tmp_path a run folder holding a copy of its step_1.pt and a CTranslate2 export."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "checkpoints" / "step_1.pt", tmp_path / "run" / "checkpoints" / "step_1.pt")
    shutil.copytree(tiny_ctranslate2, tmp_path / "ct2")
    return {"run": tiny_run}


def refusal(exit: pytest.ExceptionInfo, capsys: pytest.CaptureFixture) -> str:
    """The one line a command stopped with: its exit message, or the last line it wrote to stderr."""
    code = exit.value.code
    assert code not in (0, None)
    if isinstance(code, str):
        message = code
        assert "\n" not in message, message
    else:
        lines = capsys.readouterr().err.strip().splitlines()
        message = lines[-1] if lines else ""
    assert "error: " in message, message
    return message


def outputs(tmp_path: Path, before: set[Path]) -> set[Path]:
    return {p for p in tmp_path.rglob("*") if p not in before}


def test_the_payloads_run_when_loaded_unsafely(tmp_path):
    """The markers would be created: the refusals below are not vacuous."""
    for form, write in PICKLE_FORMS.items():
        marker = tmp_path / f"ran-{form.replace(' ', '-')}"
        write(tmp_path / "bad.pt", {"model": Payload(f"touch {marker}")})
        if form == "bare pickle":
            pickle.loads((tmp_path / "bad.pt").read_bytes())
        else:
            torch.load(tmp_path / "bad.pt", weights_only=False)
        assert marker.exists(), form
    for tag, value in YAML_TAGS.items():
        marker = tmp_path / f"ran-{tag}"
        yaml.unsafe_load(f"train:\n  seed: {value.format(marker=marker)}\n")
        assert marker.exists(), tag


@pytest.mark.parametrize("form", PICKLE_FORMS)
@pytest.mark.parametrize("entry", CHECKPOINT_READERS)
def test_a_pickle_with_code_is_refused_and_never_runs(entry, form, fixtures, tmp_path, capsys):
    case = CHECKPOINT_READERS[entry]
    marker = tmp_path / "ran"
    payload = Payload(f"touch {marker}")
    bad = tmp_path / case.where.format(bad="bad.pt")
    PICKLE_FORMS[form](bad, {"format": FORMAT, "config": {}, "model": payload, "tokenizers": payload,
                             "settings": payload, "tokenizer": payload})
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit:
        case.main(case.argv(bad, tmp_path, fixtures))
    message = refusal(exit, capsys)
    assert not marker.exists()
    assert str(bad) in message
    if bad.suffix == ".safetensors":  # read as safetensors, never unpickled
        assert "not a readable safetensors file" in message, message
    else:
        assert "refused: the file contains code" in message and message.endswith("from a source you trust"), message
        if form != "bare pickle":  # torch's files name what the pickle imports
            assert "it tries to import posix.system" in message or "nt.system" in message, message
    assert not {p for p in outputs(tmp_path, before) if p.suffix in (".txt", ".png", ".pt") or p.name == "hf"}


@pytest.mark.parametrize("tag", YAML_TAGS)
@pytest.mark.parametrize("entry", CONFIG_READERS)
def test_yaml_with_a_python_tag_is_refused_and_never_runs(entry, tag, fixtures, tmp_path, capsys):
    case = CONFIG_READERS[entry]
    marker = tmp_path / "ran"
    bad = tmp_path / case.where
    value = YAML_TAGS[tag].format(marker=marker)
    bad.write_text(f"train:\n  seed: {value}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit:
        case.main(case.argv(bad, tmp_path, fixtures))
    message = refusal(exit, capsys)
    assert not marker.exists()
    assert str(bad) in message and "python/object" in message, message
    assert not (tmp_path / "hyp.txt").exists()


@pytest.mark.parametrize("tag", YAML_TAGS)
@pytest.mark.parametrize("entry", OVERRIDE_READERS)
def test_an_override_with_a_python_tag_is_refused_and_never_runs(entry, tag, fixtures, tmp_path, capsys):
    case = OVERRIDE_READERS[entry]
    marker = tmp_path / "ran"
    value = YAML_TAGS[tag].format(marker=marker)
    with pytest.raises(SystemExit) as exit:
        case.main(case.argv(value, tmp_path, fixtures))
    message = refusal(exit, capsys)
    assert not marker.exists()
    assert value in message and "python/object" in message, message
    assert not (tmp_path / "prepared").exists()
