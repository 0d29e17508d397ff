"""No command writes over its own input: for every command and every path it writes, pointing that
path at one of the command's inputs (under the same name, another spelling of it, a symlink or a
hard link) is refused with one line naming the option and the path, before anything is written.

The table below lists one row per (command, written path, input); each row runs under every
spelling. A test over the commands' argument parsers keeps the table complete: an option that names
a path must be listed as read or written here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from transformer import train
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.commands import attention, average, evaluate, export, generate, translate
from transformer.data import prepare
from transformer.training.run_folder import check_run_paths

pytestmark = pytest.mark.usefixtures("one_thread")

SPELLINGS = ("same", "respelled", "symlink", "hardlink")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under `folder`: a content hash, or where a link points."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "folder"
    return found


@pytest.fixture
def ws(tiny_run, tmp_path) -> Path:
    """A workspace of copies, so that a command that wrongly writes cannot touch `tiny_run`:
    data/ (the corpus), model/model.pt (a checkpoint whose test split is data/), model/other.pt,
    and config.yaml (training on data/ into run/)."""
    data = tmp_path / "data"
    data.mkdir()
    for path in (tiny_run / "data").iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    (tmp_path / "model").mkdir()
    for name, step in (("model.pt", 1), ("other.pt", 2)):
        state = load_checkpoint(tiny_run / "checkpoints" / f"step_{step}.pt")
        state.pop("format")
        state["config"]["data"]["local_dir"] = str(data)
        save_checkpoint(state, tmp_path / "model" / name)
    config = yaml.safe_load((tiny_run / "config.yaml").read_text(encoding="utf-8"))
    config["data"]["local_dir"] = str(data)
    config["train"]["output_dir"] = str(tmp_path / "run")
    config["tokenizer"]["vocab_size"] = 100
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp_path


def spelled(path: Path, spelling: str, ws: Path, monkeypatch) -> Path:
    """Another name of `path`: itself, a relative path through "." (from ws/), a symlink to it, or
    a hard link to it."""
    if spelling == "same":
        return path
    if spelling == "respelled":
        monkeypatch.chdir(ws)
        relative = path.relative_to(ws)
        return Path(relative.parent, ".", relative.name) if relative.parent != Path(".") else Path(".", relative.name)
    other = ws / "links" / f"{spelling}-{path.name}"
    other.parent.mkdir(exist_ok=True)
    if spelling == "symlink":
        other.symlink_to(path)
    else:
        os.link(path, other)
    return other


@dataclass
class Row:
    """One written path pointed at one input: `args(ws, out)` is the command line with the output `out`."""

    command: Callable[[list[str] | None], None]
    option: str  # as the error names it
    victim: str  # the input, relative to ws/
    args: Callable[[Path, Path], list[str]]
    folder: bool = False  # the victim is a folder (no hard link to it)


def model(ws: Path) -> list[str]:
    return ["--checkpoint", str(ws / "model" / "model.pt"), "--device", "cpu"]


def files(ws: Path) -> list[str]:
    return ["--src", str(ws / "data" / "test.de"), "--ref", str(ws / "data" / "test.en")]


def training(ws: Path, **settings: Path) -> list[str]:
    """`--config ws/config.yaml` with `key=value` overrides (dots written as "__")."""
    return ["--config", str(ws / "config.yaml"), *(f"{k.replace('__', '.')}={v}" for k, v in settings.items())]


ROWS = {
    "evaluate --output = --checkpoint": Row(evaluate.main, "--output", "model/model.pt",
                                            lambda ws, out: [*model(ws), *files(ws), "--output", str(out)]),
    "evaluate --output = --ref": Row(evaluate.main, "--output", "data/test.en",
                                     lambda ws, out: [*model(ws), *files(ws), "--output", str(out)]),
    "evaluate --output = --src": Row(evaluate.main, "--output", "data/test.de",
                                     lambda ws, out: [*model(ws), *files(ws), "--output", str(out)]),
    "evaluate --output = --rerank-with": Row(
        evaluate.main, "--output", "model/other.pt",
        lambda ws, out: [*model(ws), *files(ws), "--rerank-with", str(ws / "model" / "other.pt"), "--output", str(out)]),
    "evaluate --output = a file of the split": Row(evaluate.main, "--output", "data/valid.en",
                                                  lambda ws, out: [*model(ws), "--split", "valid", "--output", str(out)]),
    "translate stdout = --input": Row(translate.main, "standard output", "data/test.de",
                                      lambda ws, out: [*model(ws), "--input", str(ws / "data" / "test.de")]),
    "translate stdout = stdin": Row(translate.main, "standard output", "data/test.de", lambda ws, out: model(ws)),
    "translate stdout = --checkpoint": Row(translate.main, "standard output", "model/model.pt",
                                           lambda ws, out: [*model(ws), "--input", str(ws / "data" / "test.de")]),
    "average --output = --inputs": Row(
        average.main, "--output", "model/other.pt",
        lambda ws, out: ["--inputs", str(ws / "model" / "model.pt"), str(ws / "model" / "other.pt"), "--output", str(out)]),
    "attention --output = --checkpoint": Row(attention.main, "--output", "model/model.pt",
                                             lambda ws, out: [*model(ws), "--sentence", "ein hund", "--output", str(out)]),
    "export --output = --checkpoint": Row(
        export.main, "--output", "model/model.pt",
        lambda ws, out: ["--checkpoint", str(ws / "model" / "model.pt"), "--format", "hf", "--output", str(out)]),
    "export --output holds --checkpoint": Row(
        export.main, "--output", "model",
        lambda ws, out: ["--checkpoint", str(ws / "model" / "model.pt"), "--format", "hf", "--output", str(out)],
        folder=True),
    "prepare data.prepared_dir = a training file": Row(
        prepare.main, "data.prepared_dir", "data/train.en",
        lambda ws, out: training(ws, data__prepared_dir=out)),
    "prepare data.prepared_dir holds the training files": Row(
        prepare.main, "data.prepared_dir", "data", lambda ws, out: training(ws, data__prepared_dir=out), folder=True),
    "prepare data.prepared_dir = --config": Row(
        prepare.main, "data.prepared_dir", "config.yaml", lambda ws, out: training(ws, data__prepared_dir=out)),
    "train data.prepared_dir holds the training files": Row(
        train.main, "data.prepared_dir", "data", lambda ws, out: training(ws, data__prepared_dir=out), folder=True),
    "train data.prepared_dir = --config": Row(
        train.main, "data.prepared_dir", "config.yaml", lambda ws, out: training(ws, data__prepared_dir=out)),
    # A run folder holding the config as its config.yaml would overwrite it with the resolved one.
    "train train.output_dir holds --config as config.yaml": Row(
        train.main, "train.output_dir", ".", lambda ws, out: training(ws, train__output_dir=out), folder=True),
}


def never(*args, **kwargs):
    raise AssertionError("translated although the output is an input")


def run_row(row: Row, ws: Path, out: Path, monkeypatch) -> pytest.ExceptionInfo:
    argv = row.args(ws, out)
    if row.command is translate.main:  # the output is standard output, opened on `out`
        # Reading a file while appending to it would never end: fail at the first translation instead.
        monkeypatch.setattr(translate, "translate", never)
        monkeypatch.setattr(sys, "stdout", open(out, "a", encoding="utf-8"))
        if "--input" not in argv:
            monkeypatch.setattr(sys, "stdin", open(ws / row.victim, encoding="utf-8"))
    try:
        with pytest.raises(SystemExit) as exit:
            row.command(argv)
    finally:
        if row.command is translate.main:
            sys.stdout.close()
            if "--input" not in argv:
                sys.stdin.close()
    return exit


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", ROWS)
def test_no_command_writes_over_its_own_input(name, spelling, ws, monkeypatch):
    row = ROWS[name]
    if row.folder and spelling == "hardlink":
        pytest.skip("folders have no hard links")
    victim = ws / row.victim
    out = spelled(victim, spelling, ws, monkeypatch)
    before = snapshot(ws)
    exit = run_row(row, ws, out, monkeypatch)
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert row.option in message, message
    if row.option != "standard output":
        assert str(out) in message, message
    assert snapshot(ws) == before  # the input byte for byte, and nothing written anywhere


def test_train_may_rewrite_the_config_yaml_it_wrote_when_it_resumes(ws):
    """--resume with the run's own config.yaml is how a run is continued: it records the same run."""
    run_dir = ws / "run"
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_bytes((ws / "config.yaml").read_bytes())
    check_run_paths(train.load_config(config, []), config, resume=True)
    with pytest.raises(OSError, match="train.output_dir .*config.yaml is the --config file"):
        check_run_paths(train.load_config(config, []), config, resume=False)


def test_train_refuses_a_prepared_folder_that_holds_the_run(ws):
    """Preparing the folder again would delete the run."""
    cfg = train.load_config(ws / "config.yaml", [f"data.prepared_dir={ws / 'prep'}", f"train.output_dir={ws / 'prep' / 'run'}"])
    with pytest.raises(OSError, match="data.prepared_dir .* holds the run folder"):
        check_run_paths(cfg)


# Every option that names a path, by command: read (an input) or written (a row above).
PATH_OPTIONS = {
    "evaluate": {"read": {"--checkpoint", "--rerank-with", "--src", "--ref"}, "written": {"--output"}},
    "translate": {"read": {"--checkpoint", "--rerank-with", "--input"}, "written": set()},
    "average": {"read": {"--inputs", "--run-dir"}, "written": {"--output"}},
    "attention": {"read": {"--checkpoint"}, "written": {"--output"}},
    "export": {"read": {"--checkpoint"}, "written": {"--output"}},
    "generate": {"read": {"checkpoint"}, "written": set()},
}
PARSERS = {"evaluate": evaluate._parser, "translate": translate._parser, "average": average._parser,
           "attention": attention._parser, "export": export._parser, "generate": generate._parser}


def path_options(parser: argparse.ArgumentParser) -> set[str]:
    """The options of `parser` that take a path: typed Path, or named CKPT."""
    return {(action.option_strings or [action.dest])[0] for action in parser._actions
            if action.type is Path or action.metavar == "CKPT"}


@pytest.mark.parametrize("command", PARSERS)
def test_every_path_option_is_known_as_read_or_written_and_every_written_one_has_rows(command):
    known = PATH_OPTIONS[command]
    assert path_options(PARSERS[command]()) == known["read"] | known["written"]
    for option in known["written"]:
        assert any(name.startswith(f"{command} {option}") for name in ROWS), (command, option)
