"""Export a trained model to Hugging Face Transformers (Marian) or CTranslate2.

`transformer-export --checkpoint CKPT [CKPT ...] --format hf|ctranslate2 --output DIR`

This package's model is Marian's architecture: post-LN, embeddings scaled by sqrt(d_model), one
embedding matrix shared by source, target and the output projection, ReLU in the feed-forward
network, fixed sinusoidal positions. One difference remains: the paper (and this package)
interleaves sines and cosines, PE(pos, 2i) = sin and PE(pos, 2i+1) = cos, while Marian puts all
sines in the first half of the vector and all cosines in the second. The two tables are the same up
to a fixed permutation P of the d_model coordinates (`residual_permutation`), and every layer is
equivariant under a permutation of the residual stream: LayerNorm's mean and variance do not depend
on the order of the coordinates, and attention and the feed-forward network read the residual
stream only through weight matrices (whose input columns can be permuted) and write to it only
through weight matrices (whose output rows can be permuted). Permuting the embedding columns, the
LayerNorm parameters, the input columns of every projection that reads the residual stream and the
output rows of every projection that writes to it therefore gives a Marian model whose hidden
states are ours permuted by P and whose logits are ours.

The Hugging Face folder is written by `MarianMTModel.save_pretrained` (safetensors) and
`MarianTokenizer.save_pretrained`, so it loads with no code from this package; the CTranslate2
model is converted from that folder by CTranslate2's own converter (see `transformer.decoding.ctranslate2_engine`).
Everything is written into a temporary folder beside DIR and renamed into place at the end, so an
error leaves no half-written DIR behind; the next export deletes the ones that killed exports left
(each names its process).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from transformer.atomic import check_not_an_input, remove_stale_staging_folders, staging_folder
from transformer.checkpoint import CheckpointError, LoadedModel, load_model
from transformer.config import Config, config_to_dict, finite_float
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.model import Transformer
from transformer.model.positional import sinusoidal_table

logger = logging.getLogger(__name__)

FORMATS = ("hf", "ctranslate2")
CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16")
TRAINING_CONFIG = "training_config.yaml"  # the resolved config, beside the exported weights
INSTALL_HINT = "pip install 'transformer[export]'"


class ExportError(ValueError):
    """A model or an output folder that cannot be exported to; the message is one line."""


def check_exportable(config: Config) -> None:
    """Refuse model settings that Marian cannot express.

    Raises:
        ExportError: naming the first such setting.
    """
    m = config.model
    activation = getattr(m, "activation", "relu")  # a config without the key is the paper's ReLU
    problems = (
        (m.norm_first, "model.norm_first=true (pre-LN): Marian is post-LN"),
        (m.positional != "sinusoidal", f"model.positional={m.positional!r}: Marian has fixed sinusoidal positions only"),
        (not m.share_embeddings, "model.share_embeddings=false: the export needs one embedding matrix shared by "
                                 "source and target (a joint vocabulary)"),
        (not m.tie_output, "model.tie_output=false: Marian ties the output projection to the embeddings"),
        (activation not in ("relu", "gelu"), f"model.activation={activation!r}: Marian's are relu and gelu"),
        (m.d_model % 2 != 0, f"model.d_model={m.d_model}: sinusoidal positions need an even width"),
    )
    for bad, message in problems:
        if bad:
            raise ExportError(f"cannot export {message}")


def residual_permutation(d_model: int) -> torch.Tensor:
    """P with Marian's coordinate i = our coordinate P[i]: even coordinates (sines) first, then odd (cosines).

    Returns:
        (D,) LongTensor.
    """
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_state_dict(model: Transformer, max_positions: int) -> dict[str, torch.Tensor]:
    """Our parameters under Marian's names, with the residual stream permuted by `residual_permutation`.

    Args:
        model: a post-LN model with shared, tied embeddings and sinusoidal positions.
        max_positions: rows of Marian's positional tables.

    Returns:
        Every entry of `MarianMTModel.state_dict()` for the matching config, float32.
    """
    p = residual_permutation(model.d_model)
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def attention(src: str, dst: str) -> None:
        for name, weight, bias in zip("qkv", ours[f"{src}.in_proj.weight"].chunk(3), ours[f"{src}.in_proj.bias"].chunk(3)):
            out[f"{dst}.{name}_proj.weight"] = weight[:, p]  # reads the residual stream
            out[f"{dst}.{name}_proj.bias"] = bias
        out[f"{dst}.out_proj.weight"] = ours[f"{src}.out_proj.weight"][p]  # writes to it
        out[f"{dst}.out_proj.bias"] = ours[f"{src}.out_proj.bias"][p]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = ours[f"{src}.weight"][p], ours[f"{src}.bias"][p]

    def feed_forward(src: str, dst: str) -> None:
        out[f"{dst}.fc1.weight"], out[f"{dst}.fc1.bias"] = ours[f"{src}.linear1.weight"][:, p], ours[f"{src}.linear1.bias"]
        out[f"{dst}.fc2.weight"], out[f"{dst}.fc2.bias"] = ours[f"{src}.linear2.weight"][p], ours[f"{src}.linear2.bias"][p]

    embedding = ours["src_embed.weight"][:, p]
    positions = sinusoidal_table(max_positions, model.d_model)[:, p]
    for name in ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
        out[f"{name}.weight"] = embedding
    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_positions.weight"] = positions
    out["final_logits_bias"] = torch.zeros(1, embedding.size(0))
    for i in range(len(model.encoder.layers)):
        src, dst = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attn")
        norm(f"{src}.norm1", f"{dst}.self_attn_layer_norm")
        feed_forward(f"{src}.ff", dst)
        norm(f"{src}.norm2", f"{dst}.final_layer_norm")
    for i in range(len(model.decoder.layers)):
        src, dst = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        attention(f"{src}.self_attn", f"{dst}.self_attn")
        norm(f"{src}.norm1", f"{dst}.self_attn_layer_norm")
        attention(f"{src}.cross_attn", f"{dst}.encoder_attn")
        norm(f"{src}.norm2", f"{dst}.encoder_attn_layer_norm")
        feed_forward(f"{src}.ff", dst)
        norm(f"{src}.norm3", f"{dst}.final_layer_norm")
    return out


def max_output_length(config: Config) -> int:
    """Decoder tokens (start token included) that Hugging Face may generate: the most our search
    allows for the longest training source, floor(a * data.max_len + b) + EOS + start."""
    return int(config.decode.max_len_a * config.data.max_len + config.decode.max_len_b) + 2


def marian_config(config: Config, vocab_size: int) -> Any:
    """The `MarianConfig` of our model (dropout kept for fine-tuning; inference ignores it)."""
    from transformers import MarianConfig

    m = config.model
    return MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=m.d_model,
        encoder_layers=m.n_encoder_layers, decoder_layers=m.n_decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function=getattr(m, "activation", "relu"),
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=0.0,
        max_position_embeddings=max(m.max_len, max_output_length(config)), scale_embedding=True,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
    )


def generation_config(config: Config, length_penalty: float) -> Any:
    """Hugging Face generation defaults: the checkpoint's beam size, `length_penalty`, our banned tokens.

    Hugging Face divides a hypothesis's log-probability by length^length_penalty, where our search
    divides by GNMT's ((5 + length) / 6)^alpha: the two alphas are not interchangeable, so the
    value is the one for Hugging Face's form, and the file says so in `length_penalty_form`.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        forced_eos_token_id=EOS_ID, bad_words_ids=[[PAD_ID], [BOS_ID]], num_beams=config.decode.beam_size,
        length_penalty=length_penalty, max_length=max_output_length(config),
        length_penalty_form="sum(log p) / length ** length_penalty (Hugging Face, CTranslate2)",
    )


def save_marian_tokenizer(loaded: LoadedModel, folder: Path) -> None:
    """Write the SentencePiece model and its piece -> id table as a `MarianTokenizer` folder.

    MarianTokenizer splits text into pieces with the SentencePiece model and looks each piece up in
    vocab.json; built from the same model, that table gives our ids. The special tokens are set
    from our fixed ids rather than left to Marian's defaults.
    """
    from transformers import MarianTokenizer

    tokenizer = loaded.src_tokenizer
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    with tempfile.TemporaryDirectory() as tmp:
        spm_path = Path(tmp) / "source.spm"
        spm_path.write_bytes(tokenizer.to_bytes())
        vocab_path = Path(tmp) / "vocab.json"
        vocab_path.write_text(json.dumps({piece: i for i, piece in enumerate(pieces)}, ensure_ascii=False, allow_nan=False),
                              encoding="utf-8")
        marian = MarianTokenizer(
            str(spm_path), str(spm_path), str(vocab_path), source_lang=loaded.config.data.src_lang,
            target_lang=loaded.config.data.tgt_lang, unk_token=pieces[UNK_ID], eos_token=pieces[EOS_ID],
            pad_token=pieces[PAD_ID], bos_token=pieces[BOS_ID],
            model_max_length=max(loaded.config.model.max_len, loaded.config.data.max_len),
        )
        marian.save_pretrained(str(folder))


def _run_metrics(checkpoint: Path) -> list[dict[str, Any]]:
    """The validation rows of the checkpoint's run (`RUN/metrics.jsonl` for `RUN/checkpoints/X.pt`)."""
    path = checkpoint.resolve().parent.parent / "metrics.jsonl"
    if checkpoint.resolve().parent.name != "checkpoints" or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "valid_loss" in row:
            rows.append(row)
    return rows


def _usage(fmt: str, config: Config, length_penalty: float, pieces: Sequence[str]) -> tuple[str, str, str]:
    """The model card's front-matter library, format name and usage section for `fmt`."""
    if fmt == "hf":
        return "transformers", "Marian", """\
```python
from transformers import AutoTokenizer, MarianMTModel
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
model = MarianMTModel.from_pretrained("PATH/TO/THIS/FOLDER")
batch = tokenizer(["..."], return_tensors="pt", padding=True)
print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))
```

With Transformers 4.x, `pipeline("translation", model="PATH/TO/THIS/FOLDER")` does the same (Transformers 5
removed the translation pipeline)."""
    pad, bos, eos = pieces[PAD_ID], pieces[BOS_ID], pieces[EOS_ID]
    return "ctranslate2", "CTranslate2", f"""\
The source is the SentencePiece pieces of each sentence followed by `{eos}`; the output is
at most as long as Hugging Face's `max_length` allows (the positional table ends there):

```python
import ctranslate2
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file="PATH/TO/THIS/FOLDER/source.spm")
translator = ctranslate2.Translator("PATH/TO/THIS/FOLDER")
sources = [sp.encode(text, out_type=str) + ["{eos}"] for text in ["..."]]
results = translator.translate_batch(sources, beam_size={config.decode.beam_size}, length_penalty={length_penalty},
                                     min_decoding_length=0, max_decoding_length={max_output_length(config) - 2},
                                     suppress_sequences=[["{pad}"], ["{bos}"]])
print([sp.decode(result.hypotheses[0]) for result in results])
```

With the `transformer` package: `transformer-translate --engine ctranslate2 --checkpoint PATH/TO/THIS/FOLDER`."""


def model_card(config: Config, checkpoints: Sequence[Path], length_penalty: float, fmt: str = "hf",
               pieces: Sequence[str] = ()) -> str:
    """README.md of the exported folder: usage, data, config, and the run's validation scores.

    Args:
        fmt: "hf" or "ctranslate2" (whose usage needs the tokenizer's `pieces`, by id).
    """
    data = config.data
    source = data.local_dir if data.hub_name is None else f"{data.hub_name} (Hugging Face datasets)"
    rows = _run_metrics(checkpoints[-1])
    if rows:
        scores = ["| step | valid loss | valid BLEU |", "|---:|---:|---:|"] + [
            f"| {r.get('step')} | {r['valid_loss']:.3f} | "
            f"{'-' if r.get('valid_bleu') is None else format(r['valid_bleu'], '.2f')} |" for r in rows
        ]
        scores_text = ("Validation during training (BLEU on the first train.eval_bleu_sentences validation "
                       "sentences):\n\n" + "\n".join(scores))
    else:
        scores_text = "No metrics.jsonl was found beside the checkpoint, so no scores are listed."
    averaged = f"the parameter average of {len(checkpoints)} checkpoints" if len(checkpoints) > 1 else "one checkpoint"
    library, format_name, usage = _usage(fmt, config, length_penalty, pieces)
    route = "the `MarianMTModel` format" if fmt == "hf" else "the `MarianMTModel` format, then with CTranslate2's converter"
    return f"""---
library_name: {library}
pipeline_tag: translation
language:
- {data.src_lang}
- {data.tgt_lang}
tags:
- translation
- marian
---

# {data.src_lang} -> {data.tgt_lang} Transformer ({format_name} format)

A Transformer trained with the `transformer` package and exported, from {averaged}
({", ".join(p.name for p in checkpoints)}), to {route}. Its logits are those of the original model:
the export only renames and permutes the weights{"" if fmt == "hf" else " (and CTranslate2 may quantize them)"}.

{usage}

Generation defaults (`generation_config.json`): beam {config.decode.beam_size}, length penalty
{length_penalty} in Hugging Face's form (log-probability / length^penalty; the training package's
own search uses GNMT's ((5 + length) / 6)^alpha, alpha = {config.decode.length_penalty}, which is a
different scale), padding and the start token never generated.

## Data

Source language `{data.src_lang}`, target `{data.tgt_lang}`, from {source}: training split
`{data.train_split}`, validation `{data.valid_split}`, test `{data.test_split}`; pairs longer than
{data.max_len} tokens were left out of training. Tokenizer: SentencePiece {config.tokenizer.type},
{config.tokenizer.vocab_size} pieces, {"joint" if config.tokenizer.joint else "separate"} vocabulary.

## Scores

{scores_text}

## Training config

```yaml
{yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()}
```
"""


def write_hf(loaded: LoadedModel, folder: Path, checkpoints: Sequence[Path], length_penalty: float) -> None:
    """Write the Hugging Face Marian folder (weights as safetensors, tokenizer, generation config, card)."""
    from transformers import MarianMTModel

    config = loaded.config
    marian = MarianMTModel(marian_config(config, loaded.src_tokenizer.vocab_size))
    state = marian_state_dict(loaded.model, marian.config.max_position_embeddings)
    marian.load_state_dict(state, strict=True)
    marian.generation_config = generation_config(config, length_penalty)
    marian.save_pretrained(str(folder), safe_serialization=True)
    save_marian_tokenizer(loaded, folder)
    (folder / TRAINING_CONFIG).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    (folder / "README.md").write_text(model_card(config, checkpoints, length_penalty), encoding="utf-8")


def check_output(output: Path) -> None:
    """Refuse an output that exists and is not an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"{output}: exists and is not an empty folder; choose a new one")


def export(
    checkpoints: Sequence[Path], output: Path, fmt: str = "hf", quantization: str = "float32",
    length_penalty: float = 1.0,
) -> None:
    """Export one checkpoint, or the parameter average of several, to `output`.

    Args:
        checkpoints: this package's checkpoints; several are averaged.
        output: folder to create (it may exist if empty).
        fmt: "hf" (Hugging Face MarianMTModel) or "ctranslate2".
        quantization: CTranslate2 weight type, one of `CT2_QUANTIZATIONS`.
        length_penalty: Hugging Face / CTranslate2 length penalty written as the generation default.

    Raises:
        CheckpointError: a checkpoint that is missing or not one of this package's.
        ExportError: an unsupported model setting, an occupied output, or a missing library.
        WriteError: `output` is or holds one of `checkpoints`.
    """
    check_not_an_input("--output", output, [("the --checkpoint", path) for path in checkpoints], replaces_folder=True)
    if not math.isfinite(length_penalty):  # JSON has no NaN or infinity: the file would not parse
        raise ExportError(f"the length penalty must be a finite number, not {length_penalty}")
    check_output(output)
    loaded = load_model(checkpoints)
    check_exportable(loaded.config)
    loaded.model.float()
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging_folders(output)
    staging = staging_folder(output)
    try:
        hf_dir = staging / "hf" if fmt == "ctranslate2" else staging / "out"
        hf_dir.mkdir()
        write_hf(loaded, hf_dir, checkpoints, length_penalty)
        if fmt == "ctranslate2":
            from transformer.decoding.ctranslate2_engine import convert_marian

            convert_marian(hf_dir, staging / "out", quantization)
            pieces = [loaded.src_tokenizer.id_to_piece(i) for i in range(loaded.src_tokenizer.vocab_size)]
            card = model_card(loaded.config, checkpoints, length_penalty, fmt, pieces)
            (staging / "out" / "README.md").write_text(card, encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging / "out", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-export",
        description="Export a checkpoint to a Hugging Face MarianMTModel folder or a CTranslate2 model.",
    )
    parser.add_argument("--checkpoint", action="extend", nargs="+", required=True, type=Path, metavar="CKPT",
                        help="checkpoint file; several are averaged")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf (MarianMTModel) or ctranslate2")
    parser.add_argument("--quantization", choices=CT2_QUANTIZATIONS, default="float32",
                        help="ctranslate2 only: weight type (default: float32)")
    parser.add_argument("--length-penalty", type=finite_float, default=1.0,
                        help="generation default, Hugging Face's form: log p / length^penalty (default: 1.0)")
    parser.add_argument("--output", type=Path, required=True, help="folder to create (new, or empty)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-export`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quantization != "float32" and args.format != "ctranslate2":
        parser.error("--quantization is for --format ctranslate2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        export(args.checkpoint, args.output, args.format, args.quantization, args.length_penalty)
    except ImportError as e:
        sys.exit(f"error: --format {args.format} needs {e.name or 'a missing package'}: {INSTALL_HINT}")
    except (CheckpointError, ExportError, OSError) as e:
        sys.exit(f"error: {e}")
    logger.info("exported %s to %s (%s)", ", ".join(str(p) for p in args.checkpoint), args.output, args.format)


if __name__ == "__main__":
    main()
