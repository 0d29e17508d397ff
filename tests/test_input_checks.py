"""Values and files that must be refused with one line naming what is wrong, before they give a wrong
result or a traceback: checkpoints of another language pair, non-finite weights, options and
exported files with values out of range, tensors of the wrong shape, an empty test set."""

from pathlib import Path

import pytest
import torch

from transformer import average
from transformer.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(exit: pytest.ExceptionInfo, *fragments: str) -> str:
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert all(f in message for f in fragments), message
    return message


def variant(source: Path, path: Path, change) -> Path:
    """A copy of the checkpoint `source` at `path`, with `change(state)` applied."""
    state = load_checkpoint(source)
    state.pop("format")
    change(state)
    save_checkpoint(state, path)
    return path


def test_average_refuses_checkpoints_of_another_language_pair(tiny_run, tmp_path):
    first = tiny_run / "checkpoints" / "step_1.pt"

    def reverse(state):  # the same shapes and the same joint vocabulary, the other direction
        state["config"]["data"].update(src_lang="en", tgt_lang="de")

    en_de = variant(tiny_run / "checkpoints" / "step_2.pt", tmp_path / "en_de.pt", reverse)
    output = tmp_path / "avg.pt"
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(first), str(en_de), "--output", str(output)])
    one_line_error(exit, str(en_de), "en->de", str(first), "de->en")
    assert not output.exists()
