"""Checkpoints: atomic save, safe load, parameter averaging, and rebuilding a model for inference.

A checkpoint is one file holding everything needed to continue training or to translate: the
weights, the resolved config, the SentencePiece models (as bytes, so the file is self-contained),
and, for resuming, the optimizer state, the step, the data position and the RNG state. Files are
read with `torch.load(weights_only=True)`, which never executes code from the file.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Config, ConfigError, config_from_dict
from .model import Transformer
from .tokenizer import PAD_ID, Tokenizer

FORMAT = "transformer-checkpoint/1"
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of this project's."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then a rename.

    A process killed at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing any code from it.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no '{FORMAT}' marker)")
    return state


def tokenizer_state(src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Both SentencePiece models as uint8 tensors, for storing inside a checkpoint."""
    return {
        side: torch.frombuffer(bytearray(tok.to_bytes()), dtype=torch.uint8)
        for side, tok in (("src", src_tokenizer), ("tgt", tgt_tokenizer))
    }


def checkpoint_tokenizers(state: dict[str, Any], joint: bool, path: Path) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) tokenizers stored in a checkpoint; one object when the vocabulary is joint."""
    try:
        src = Tokenizer.from_bytes(state["tokenizers"]["src"].numpy().tobytes(), path)
        tgt = src if joint else Tokenizer.from_bytes(state["tokenizers"]["tgt"].numpy().tobytes(), path)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer in the checkpoint ({e})") from None
    return src, tgt


def checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    """The resolved config stored in a checkpoint."""
    try:
        return config_from_dict(state["config"], source=f"{path} (config)")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path}: config unusable: {e}") from None


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Average the model parameters of several checkpoints (the paper averages the last 5 or 20).

    Returns:
        The last checkpoint's state with its "model" replaced by the element-wise mean of all
        models' float tensors (kept in float64 while summing). Training state is dropped.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for path in paths:
        state = load_checkpoint(path)
        model = state.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: holds no model parameters")
        if total and model.keys() != total.keys():
            raise CheckpointError(f"{path}: its parameters differ from {paths[0]}; cannot average")
        for name, tensor in model.items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.double()
            else:
                total[name] = tensor
    averaged = {
        name: (t / len(paths)).to(state["model"][name].dtype) if t.is_floating_point() else t
        for name, t in total.items()
    }
    keep = {k: v for k, v in state.items() if k in ("config", "tokenizers", "step")}
    return {**keep, "model": averaged, "averaged_from": [str(p) for p in paths]}


def save_averaged(paths: Sequence[str | Path], output: str | Path) -> None:
    """Average `paths` (see `average_checkpoints`) and write the result atomically to `output`."""
    state = average_checkpoints(paths)
    state.pop("format", None)
    save_checkpoint(state, output)


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step checkpoints of a run directory (`checkpoints/step_N.pt`), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


@dataclass
class LoadedModel:
    """A model ready to translate, with the config and tokenizers it was trained with."""

    model: Transformer
    config: Config
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer


def load_model(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of one checkpoint, or the parameter average of several, in eval mode."""
    if not paths:
        raise CheckpointError("no checkpoint given")
    path = Path(paths[-1])
    state = average_checkpoints(paths) if len(paths) > 1 else load_checkpoint(path)
    config = checkpoint_config(state, path)
    src_tok, tgt_tok = checkpoint_tokenizers(state, config.tokenizer.joint, path)
    try:
        model = Transformer.from_config(config.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID)
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0][:200]})") from None
    return LoadedModel(model.to(device).eval(), config, src_tok, tgt_tok)
