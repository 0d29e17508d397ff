"""Decoding speed with forced lengths on random weights: ours against Hugging Face Marian and CTranslate2 (section decode).

EOS is made impossible on every side, so that each sentence of a batch runs exactly S decoder steps
(S = the batch's padded source length), whatever the random weights would generate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from bench_common import Setup, interleaved, pass_ratios, pass_seconds, progress, table
from torch import Tensor, nn

from transformer.config import Config
from transformer.data.batches import make_batches
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.ctranslate2_engine import CTranslate2Model
from transformer.decoding.quantize import quantize_int8
from transformer.decoding.search import beam_search
from transformer.model import Transformer
from transformer.runtime import has_native_bf16


def hf_marian(cfg: Config, vocab_size: int) -> nn.Module:
    """A randomly initialised `MarianMTModel` with our model's dimensions (never pretrained weights)."""
    # Imported here: it is slow, and only the decoding sections need it.
    from transformers import MarianConfig, MarianMTModel

    m = cfg.model
    config = MarianConfig(
        vocab_size=vocab_size, d_model=m.d_model, encoder_layers=m.n_encoder_layers, decoder_layers=m.n_decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads, encoder_ffn_dim=m.d_ff,
        decoder_ffn_dim=m.d_ff, max_position_embeddings=m.max_len, activation_function="relu", scale_embedding=True,
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID,
        # MarianConfig would otherwise force token 0 at the last step; lengths are fixed here anyway.
        forced_eos_token_id=None, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
    )
    return MarianMTModel(config).eval()


def decode_batches(sources: list[list[int]], batch_tokens: int) -> list[Tensor]:
    """Padded (B, S) source tensors, token-bucketed as `translator.translate_ids` batches them."""
    lengths = [len(s) for s in sources]
    batches = []
    for batch in make_batches(lengths, lengths, batch_tokens):
        rows = [sources[i] for i in batch]
        src = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = torch.tensor(ids)
        batches.append(src)
    return batches


def steps_for(src: Tensor) -> int:
    """Decoder steps every sentence of a batch gets: its padded source length (the a=1, b=0 limit)."""
    return src.size(1)


def decode_ours(model: Transformer, src: Tensor, beam_size: int, use_cache: bool) -> float:
    """Beam search for exactly `steps_for(src)` decoder steps per sentence; returns seconds.

    Random weights would end sentences at arbitrary times, so EOS is made impossible: passing
    `eos_id=PAD_ID` makes the end token one the search never generates (padding is always masked),
    so every hypothesis runs to the maximum length L = max_len_b, where the forced "EOS" step is
    the (L+1)-th decoder call. The search then returns no hypotheses, which the timing ignores.
    """
    start = time.perf_counter()
    beam_search(model, src, beam_size, 0.6, max_len_a=0.0, max_len_b=steps_for(src) - 1, bos_id=BOS_ID,
                eos_id=PAD_ID, use_cache=use_cache)
    return time.perf_counter() - start


def decode_hf(model: nn.Module, src: Tensor, beam_size: int) -> float:
    """`generate` with beam search for exactly `steps_for(src)` new tokens; returns seconds."""
    steps = steps_for(src)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=beam_size, do_sample=False,
                       length_penalty=0.6, min_new_tokens=steps, max_new_tokens=steps, use_cache=True)
    return time.perf_counter() - start


# (faster, slower, what the ratio says) for every pair of decoders the report compares.
DECODE_RATIOS = (
    ("ours (cache)", "HF Marian", "ours / HF Marian, both float32"),
    ("ours (cache, bf16)", "HF Marian (bf16)", "ours / HF Marian, both bfloat16"),
    ("ours (cache)", "CT2 float32", "ours / CTranslate2, both float32"),
    ("ours (cache, int8)", "CT2 int8", "ours / CTranslate2, both int8"),
    ("ours (cache, bf16)", "CT2 int8", "ours bfloat16 / CTranslate2 int8"),
    ("ours (cache, int8)", "ours (cache)", "ours int8 / ours float32"),
    ("CT2 int8", "CT2 float32", "CTranslate2 int8 / float32"),
    ("ours (cache)", "ours (no cache)", "ours with the cache / without it, float32"),
)


def decode_ct2(model: CTranslate2Model, src: Tensor, beam_size: int) -> float:
    """CTranslate2's beam search for exactly `steps_for(src)` decoder steps per sentence; returns seconds."""
    steps = steps_for(src)
    rows = [[model.pieces[t] for t in row if t != PAD_ID] for row in src.tolist()]
    start = time.perf_counter()
    model.translator.translate_batch(rows, beam_size=beam_size, length_penalty=0.6, min_decoding_length=steps,
                                     max_decoding_length=steps, max_input_length=0)
    return time.perf_counter() - start


def ct2_model(cfg: Config, setup: Setup, model: Transformer, folder: Path) -> Path:
    """Export `model` (with the setup's tokenizer) to a CTranslate2 float32 model in `folder`/ct2."""
    from transformer.checkpoint import save_checkpoint, tokenizer_state
    from transformer.commands.export import export
    from transformer.config import config_to_dict

    checkpoint = folder / "random.pt"
    save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(),
                     "tokenizers": tokenizer_state(setup.tokenizer, setup.tokenizer)}, checkpoint)
    export([checkpoint], folder / "ct2", "ctranslate2")
    return folder / "ct2"


def decoders(cfg: Config, setup: Setup, beam_size: int, variants: Sequence[str]) -> dict[str, Callable[[Tensor], float]]:
    """name -> function decoding one source batch and returning its seconds.

    Names: "ours (cache)", "ours (no cache)", "HF Marian", "ours (cache, bf16)", "HF Marian (bf16)",
    "ours (cache, int8)", "CT2 float32", "CT2 int8"; the "bf16" variants hold their weights (and so
    compute) in bfloat16, "int8" ones every linear layer's weights in int8, the others float32.
    Every variant of one model gets the same random weights (seed 0); CTranslate2 gets ours,
    converted by `transformer-export`.
    """
    vocab_size = setup.vocab_size
    runs: dict[str, Callable[[Tensor], float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ct2-") as tmp:  # CTranslate2 keeps the loaded model in memory
        folder = None
        for name in variants:
            dtype = torch.bfloat16 if "bf16" in name else torch.float32
            torch.manual_seed(0)
            if name.startswith("ours"):
                ours = Transformer.from_config(cfg.model, vocab_size, vocab_size, PAD_ID).eval().to(dtype)
                if "int8" in name:
                    ours = quantize_int8(ours)
                runs[name] = lambda src, m=ours, c="no cache" not in name: decode_ours(m, src, beam_size, use_cache=c)
            elif name.startswith("CT2"):
                if folder is None:
                    folder = ct2_model(cfg, setup, Transformer.from_config(cfg.model, vocab_size, vocab_size, PAD_ID),
                                       Path(tmp))
                model = CTranslate2Model(folder, name.split()[1], threads=torch.get_num_threads())
                runs[name] = lambda src, m=model: decode_ct2(m, src, beam_size)
            else:
                marian = hf_marian(cfg, vocab_size).to(dtype)
                runs[name] = lambda src, m=marian: decode_hf(m, src, beam_size)
    return runs


def time_decoding(
    cfg: Config, setup: Setup, sources: list[list[int]], beam_size: int, repeats: int, variants: Sequence[str],
) -> dict[str, dict]:
    """Interleaved decoding timings over `sources`; one short warm-up batch per variant."""
    batches = decode_batches(sources, cfg.decode.batch_tokens)
    runs = decoders(cfg, setup, beam_size, variants)
    for run in runs.values():
        run(batches[0][:4])
    times = interleaved({name: (lambda i, f=f: f(batches[i])) for name, f in runs.items()}, len(batches), repeats)
    sentences = sum(b.size(0) for b in batches)
    tokens = sum(b.size(0) * steps_for(b) for b in batches)
    results = {}
    for name, t in times.items():
        seconds = pass_seconds(t)
        results[name] = {"sentences_per_s": sentences / seconds, "tokens_per_s": tokens / seconds,
                         "seconds_per_pass": seconds, "passes_tokens_per_s": [tokens / sum(p) for p in t],
                         "sentences": sentences, "tokens": tokens, "batches": len(batches)}
    return results


def run_decode(cfg: Config, setup: Setup, args: argparse.Namespace) -> dict:
    """Beam decoding: ours with and without the cache, Hugging Face Marian, and CTranslate2."""
    native_bf16 = has_native_bf16(torch.device("cpu"))
    against_marian = ["ours (cache)", "HF Marian"] + (["ours (cache, bf16)", "HF Marian (bf16)"] if native_bf16 else [])
    against_ct2 = (["ours (cache)", "CT2 float32", "ours (cache, int8)", "CT2 int8"]
                   + (["ours (cache, bf16)"] if native_bf16 else []))
    comparisons = [(setup.test_sources, against_marian), (setup.test_sources, against_ct2)]
    if not args.skip_uncached:
        # Recomputing every prefix is slow: compared with the cache on the first sentences only.
        comparisons.append((setup.test_sources[: args.uncached_sentences], ["ours (cache)", "ours (no cache)"]))
    if args.decode_peers != "all":
        keep = {"marian": against_marian, "ctranslate2": against_ct2}[args.decode_peers]
        comparisons = [c for c in comparisons if c[1] is keep]
    results = []
    for sources, variants in comparisons:
        progress(f"decode: {len(sources)} sentences x {args.decode_repeats} repeats: {', '.join(variants)}")
        results.append(time_decoding(cfg, setup, sources, args.beam_size, args.decode_repeats, variants))
    return {"beam_size": args.beam_size, "comparisons": results}


def report_decode(results: dict) -> list[str]:
    """Markdown lines of the decode section."""
    out: list[str] = []
    d = results["decode"]
    for runs in d["comparisons"]:
        base = runs["ours (cache)"]
        rows = [[name, f"{r['sentences_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['seconds_per_pass']:.1f}", ""]
                for name, r in runs.items()]
        rows += [[f"**{label}**", f"**{runs[fast]['sentences_per_s'] / runs[slow]['sentences_per_s']:.2f}x**", "", "",
                  pass_ratios(runs[fast], runs[slow])]
                 for fast, slow, label in DECODE_RATIOS if fast in runs and slow in runs]
        caption = (f"Beam-{d['beam_size']} decoding, {base['sentences']} test sentences in {base['batches']} "
                   f"batches, each sentence decoded for its batch's padded source length "
                   f"({base['tokens']:,} target tokens); ratios of sentences/s (medians per batch; the last "
                   "column is the ratio of each timed pass over all the batches):")
        out += ["", caption, "", table(["decoder", "sentences/s", "target tokens/s", "s per pass", "per pass"], rows)]
    return out
