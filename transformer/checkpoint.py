"""Checkpoints: atomic save, safe load, parameter averaging, and rebuilding a model for inference.

A checkpoint is one file holding everything needed to continue training or to translate: the
weights, the resolved config, the SentencePiece models (as bytes, so the file is self-contained),
and, for resuming, the optimizer state, the step, the data position and the RNG state. Files are
read with `torch.load(weights_only=True)`, which never executes code from the file. For sharing
and inference, the weights, tokenizers and config can also be written as safetensors
(`save_safetensors`), which every loader here reads by the .safetensors suffix.
"""

from __future__ import annotations

import json
import logging
import pickletools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from transformer.atomic import atomic_write, atomic_write_bytes, check_not_an_input
from transformer.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from transformer.data.tokenizer import PAD_ID, Tokenizer
from transformer.model import Transformer

FORMAT = "transformer-checkpoint/1"
SAFETENSORS_FORMAT = "transformer-weights/1"  # inference-only weights + tokenizers + config
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights_only unpickler names a refused import
UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand (\d+)")  # and a byte it cannot run
PICKLE_OPCODES = {ord(op.code) for op in pickletools.opcodes}
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of this project's."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then a rename.

    A process killed at any moment leaves either the old file or the new one, never a torn file.

    Raises:
        WriteError: the file could not be written (e.g. disk full); no temporary file is left.
    """
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def save_safetensors(state: dict[str, Any], path: str | Path) -> None:
    """Write the inference part of a checkpoint (weights, tokenizers, config, step) as safetensors, atomically.

    Tensors are stored under "model.NAME" and "tokenizers.SIDE"; the config is JSON in the file's
    metadata. A tensor equal to one stored before it (tied embeddings) is stored once and recorded
    as an alias, since safetensors keeps no shared tensors.

    Raises:
        WriteError: the file could not be written; no temporary file is left.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    named = [(f"model.{k}", v) for k, v in state["model"].items()]
    named += [(f"tokenizers.{k}", v) for k, v in state["tokenizers"].items()]
    for name, tensor in named:
        same = next((other for other, t in tensors.items()
                     if t.shape == tensor.shape and t.dtype == tensor.dtype and torch.equal(t, tensor)), None)
        if same is None:
            tensors[name] = tensor.detach().contiguous().clone()
        else:
            aliases[name] = same
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(state["config"]), "aliases": json.dumps(aliases),
                "step": str(state.get("step", 0))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _load_safetensors(path: Path) -> dict[str, Any]:
    """Read a file written by `save_safetensors` back into a checkpoint dict (never unpickles)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SAFETENSORS_FORMAT:
                raise CheckpointError(f"{path}: not a safetensors file of this project (no '{SAFETENSORS_FORMAT}' marker)")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        tensors.update({name: tensors[same] for name, same in json.loads(metadata["aliases"]).items()})
        config = json.loads(metadata["config"])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises several types for foreign or truncated files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason[:200]})") from None
    return {
        "format": FORMAT, "config": config, "step": int(metadata.get("step", 0)),
        "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        "tokenizers": {k[len("tokenizers."):]: v for k, v in tensors.items() if k.startswith("tokenizers.")},
    }


def load_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` a file with `weights_only=True`, which never executes code from it.

    Raises:
        CheckpointError: one line naming the file: refused because it contains code (and what it
            imports), or not a readable torch file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        message = str(e)
        opcode = UNSUPPORTED_OPCODE.search(message)
        if opcode is not None and int(opcode.group(1)) not in PICKLE_OPCODES:
            # Not an opcode at all: a text or other foreign file, which holds no code either.
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file)") from None
        if "Weights only load failed" in message:
            imports = UNSAFE_GLOBAL.findall(message)
            what = f"it tries to import {', '.join(dict.fromkeys(imports))}" if imports else "objects other than plain data"
            raise CheckpointError(f"{path}: refused: the file contains code ({what}); loading it could run that code, "
                                  f"so it was not loaded. Use only checkpoints from a source you trust") from None
        reason = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (or a `save_safetensors` file, by its .safetensors suffix) without executing any code from it.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    state = load_torch_file(path, map_location)
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

    Raises:
        CheckpointError: a file that does not load, or one whose model config, language pair or
            tokenizers differ from the first file's (named in the message).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        state = load_checkpoint(path)
        model = state.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: holds no model parameters")
        if total and model.keys() != total.keys():
            raise CheckpointError(f"{path}: its parameters differ from {paths[0]}; cannot average")
        check_finite(model, path)
        if first is None:
            first = {key: state[key] for key in ("config", "tokenizers") if key in state}  # not its optimizer state
        else:
            _check_same_run(first, state, paths[0], path)
        for name, tensor in model.items():
            if name in total and tensor.shape != total[name].shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, in {paths[0]} it has "
                                      f"{tuple(total[name].shape)}; cannot average")
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


def _check_same_run(first: dict[str, Any], other: dict[str, Any], first_path: str | Path, path: str | Path) -> None:
    """Refuse to average checkpoints whose models, language pairs or tokenizers differ: the mean would be meaningless."""
    model_a, model_b = (s.get("config", {}).get("model", {}) for s in (first, other))
    differing = [key for key in sorted(set(model_a) | set(model_b)) if model_a.get(key) != model_b.get(key)]
    if differing:
        key = differing[0]
        raise CheckpointError(f"{path}: model.{key} is {model_b.get(key)!r}, in {first_path} it is {model_a.get(key)!r}; "
                              "checkpoints of different models cannot be averaged")
    # A joint vocabulary and equal shapes do not make two directions one model.
    data_a, data_b = (s.get("config", {}).get("data", {}) for s in (first, other))
    pair_a, pair_b = (f"{data.get('src_lang')}->{data.get('tgt_lang')}" for data in (data_a, data_b))
    if pair_a != pair_b:
        raise CheckpointError(f"{path}: translates {pair_b}, {first_path} translates {pair_a}; "
                              "checkpoints of different language pairs cannot be averaged")
    for side in ("src", "tgt"):
        a, b = (s.get("tokenizers", {}).get(side) for s in (first, other))
        if a is None or b is None or not torch.equal(a, b):
            raise CheckpointError(f"{path}: its {side} tokenizer differs from the one in {first_path}; "
                                  "checkpoints of different runs cannot be averaged")


def save_averaged(paths: Sequence[str | Path], output: str | Path, fmt: str = "checkpoint") -> None:
    """Average `paths` (see `average_checkpoints`) and write the result atomically to `output`.

    Args:
        fmt: "checkpoint" (torch file) or "safetensors" (weights, tokenizers and config only).

    Raises:
        CheckpointError: the inputs cannot be averaged, `output` is a folder, or its suffix does not
            match `fmt`.
        WriteError: `output` is one of `paths` under any name (writing it would lose the training
            state that resuming needs), or cannot be written; no temporary file is left.
    """
    output = Path(output)
    check_not_an_input("--output", output, [("one of the checkpoints to average", path) for path in paths])
    if output.is_dir():
        raise CheckpointError(f"{output}: is a folder; give the averaged checkpoint a file name")
    if (fmt == "safetensors") != (output.suffix == ".safetensors"):  # loaders pick the reader by the suffix
        raise CheckpointError(f"{output}: a {fmt} file must {'' if fmt == 'safetensors' else 'not '}be named *.safetensors, "
                              "or it could not be loaded")
    state = average_checkpoints(paths)
    state.pop("format", None)
    if fmt == "safetensors":
        save_safetensors(state, output)
    else:
        save_checkpoint(state, output)


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step checkpoints of a run directory (`checkpoints/step_N.pt`), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def load_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The newest step checkpoint of a run that loads and holds a training state.

    Returns:
        Its path, its contents, and the newer checkpoints skipped, each with the reason.

    Raises:
        CheckpointError: the run has no step checkpoints, or none of them loads.
    """
    found = run_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: --resume given but the run has no checkpoints/step_*.pt")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
            missing = [key for key in RESUME_KEYS if key not in state]
            if missing:
                raise CheckpointError(f"{path}: no training state ({', '.join(missing)} missing)")
        except CheckpointError as e:
            log.warning("skipping %s: %s", path, e)
            skipped.append((path, str(e)))
            continue
        return path, state, skipped
    raise CheckpointError(f"{run_dir}: none of the {len(found)} step checkpoints can be resumed from; "
                          f"the newest: {skipped[0][1]}")


RESUME_KEYS = ("config", "model", "tokenizers", "optimizer", "position", "rng")
# Settings a resumed run may change: budgets, logging, validation, checkpoint cadence, decoding for
# validation, the test split (training never reads it), and where and how fast it runs. Everything
# else changes the model, the tokenizer, the data or the optimisation that the checkpoint's state
# belongs to.
RESUME_MAY_CHANGE = {
    "tokenizer.cache_dir", "data.test_split", "data.hub_test_split",
    *(f"train.{key}" for key in (
        "output_dir", "device", "threads", "precision", "max_steps", "max_epochs", "max_minutes", "log_every",
        "eval_every", "eval_bleu_sentences", "save_every", "keep_last", "patience", "max_nonfinite", "average_last",
        "short_budget_max_steps",
    )),
    *(f"decode.{key}" for key in config_to_dict(Config())["decode"]),
}


def _flatten(config: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config_to_dict(config).items() for key, value in values.items()}


def resume_changes(saved: Config, requested: Config, step: int) -> list[str]:
    """Compare a checkpoint's config with the one a resumed run asks for.

    Args:
        saved: the config stored in the checkpoint.
        requested: the config of the run that resumes it.
        step: the checkpoint's step.

    Returns:
        The accepted changes, as "key old -> new".

    Raises:
        CheckpointError: one line listing every change a resumed run may not make: settings outside
            `RESUME_MAY_CHANGE`, and `train.max_steps` lowered.
    """
    old, new = _flatten(saved), _flatten(requested)
    changes = {key: f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in new if old.get(key) != new.get(key)}
    refused = [text for key, text in changes.items() if key not in RESUME_MAY_CHANGE]
    steps_old, steps_new = saved.train.max_steps, requested.train.max_steps
    if steps_old and (0 < steps_new < steps_old):
        refused.append(f"{changes['train.max_steps']} (it may only grow)")
    if refused:
        raise CheckpointError(f"cannot resume the run at step {step} with other settings: {'; '.join(refused)}. "
                              "Keep them as the run had them (see its config.yaml), or start a new run in another "
                              "train.output_dir")
    return [text for key, text in changes.items() if key != "train.output_dir"]


@dataclass
class LoadedModel:
    """A model ready to translate, with the config and tokenizers it was trained with.

    `model` is a `Transformer`, possibly cast to bfloat16 or replaced by its int8 copy from
    `transformer.decoding.quantize`. What decodes it is an engine (`transformer.decoding.translator.TorchEngine`);
    an exported model that another engine decodes is no `LoadedModel` (`transformer.commands.options.load_engine`).
    """

    model: Transformer
    config: Config
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer


def elements_bound(model: ModelConfig, src_vocab: int, tgt_vocab: int) -> int:
    """More elements than the parameters and buffers of the `Transformer` of `model` hold together:
    an upper bound, not a count (tests/test_input_checks.py checks it against built models).

    Two target-sized tables (embedding and an untied projection, plus its bias), the source table,
    positions learned or precomputed, final norms, and per layer at most 12 D^2 + 2 D d_ff weights
    (a decoder layer has 8 D^2) and 16 D + d_ff biases and norm parameters.
    """
    D, F = model.d_model, model.d_ff
    layers = model.n_encoder_layers + model.n_decoder_layers
    return ((src_vocab + 2 * tgt_vocab + 2 * model.max_len + 4) * D + tgt_vocab
            + layers * (12 * D * D + 2 * D * F + 16 * D + F))


def _elements(weights: Any) -> int:
    """Elements of the tensors of a loaded state dict (0 for anything else)."""
    if not isinstance(weights, dict):
        return 0
    return sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))


def load_model(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of one checkpoint, or the parameter average of several, in eval mode."""
    if not paths:
        raise CheckpointError("no checkpoint given")
    path = Path(paths[-1])
    state = average_checkpoints(paths) if len(paths) > 1 else load_checkpoint(path)
    config = checkpoint_config(state, path)
    src_tok, tgt_tok = checkpoint_tokenizers(state, config.tokenizer.joint, path)
    weights = state["model"]
    try:
        if elements_bound(config.model, src_tok.vocab_size, tgt_tok.vocab_size) > 2 * _elements(weights) + (1 << 20):
            # A config that asks for far more than the file holds: its shapes are checked on a model
            # without storage first, so that a small file whose config asks for a huge model (each
            # size within its limit) is refused before that model is allocated. Only such a file
            # takes this path: building on the meta device loads PyTorch's compiler stack (about a
            # second), which an honest checkpoint should not cost every command that starts.
            with torch.device("meta"):
                check_weights(Transformer.from_config(config.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID),
                              weights, path)
        model = Transformer.from_config(config.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID)
        check_weights(model, weights, path)
        model.load_state_dict(weights)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0][:200]})") from None
    return LoadedModel(model.to(device).eval(), config, src_tok, tgt_tok)


def check_finite(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity: decoding with them writes garbage or fails inside the search.

    Raises:
        CheckpointError: naming the file and its first non-finite tensor.
    """
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name} is not finite ({bad} of its {tensor.numel()} values are NaN "
                                  "or infinite); a model with such weights cannot be used")


def check_weights(model: torch.nn.Module, weights: Any, path: str | Path) -> None:
    """Refuse weights that `model.load_state_dict` would not take, or that are not finite, naming the tensor.

    `load_state_dict` reports every mismatch in a many-line message; this names the first one, with
    the shape found and the shape the model needs.

    Raises:
        CheckpointError: one line naming the file and the tensor missing, unexpected, of the wrong
            shape, or not finite.
    """
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds no model parameters")
    expected = model.state_dict()
    for name, tensor in expected.items():
        found = weights.get(name)
        if not isinstance(found, torch.Tensor):
            raise CheckpointError(f"{path}: no tensor {name}, which the model of its config needs")
        if found.shape != tensor.shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(found.shape)}, the model of its config "
                                  f"needs {tuple(tensor.shape)}")
    unexpected = [name for name in weights if name not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: tensor {unexpected[0]} is not part of the model of its config")
    check_finite(weights, path)
