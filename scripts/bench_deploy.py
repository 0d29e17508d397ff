"""Real decoding with a trained checkpoint: ours (fp32, bf16, int8) against its exports (section deploy).

The checkpoint is exported to a Hugging Face Marian folder and a CTranslate2 model, and six
decoders translate the same sentences through the same tokenization and batching
(`transformer.decoding.translator.source_ids`, token-bucketed batches) and the same sacreBLEU scoring:
ours in float32, bfloat16 and int8 (`transformer.decoding.quantize`), the exported `MarianMTModel`
(float32), and CTranslate2 in float32 and int8.

* Greedy search on the test set is the identity check: the exported models compute our function,
  so float32 greedy outputs must be the same sentences.
* Beam search scores hypotheses with a length penalty whose form differs: ours is GNMT's
  ((5 + |Y|) / 6)^alpha, Hugging Face's and CTranslate2's is |Y|^alpha. Each engine gets its own
  alpha, the best of a small grid on the validation set (ours chosen in float32, used for bf16 and
  int8 too); then the test set is decoded with it, every decoder in turn per pass (the starting one
  rotating), and sentences/s is the median over passes. Every pair of decoders gets its ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from bench_common import progress, table
from sacrebleu.metrics import BLEU

from transformer.checkpoint import load_model
from transformer.commands.export import export
from transformer.data.batches import load_split, make_batches
from transformer.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from transformer.decoding.ctranslate2_engine import CTranslate2Model
from transformer.decoding.quantize import quantize_int8
from transformer.decoding.translator import source_ids, translate_ids
from transformer.runtime import has_native_bf16

# A decoder: (sources, beam size, alpha) -> output ids per source.
Decoder = Callable[[Sequence[Sequence[int]], int, float], list[list[int]]]


def hf_translate_ids(model: torch.nn.Module, sources: Sequence[Sequence[int]], beam_size: int, alpha: float,
                     max_len_a: float, max_len_b: int, batch_tokens: int) -> list[list[int]]:
    """`MarianMTModel.generate` over our batches; each output cut at its own sentence's length limit.

    `generate` takes one length limit per call: it gets the batch's largest, floor(a * S + b) tokens
    and EOS (the exported generation config forces EOS at the limit, as our search does).
    """
    outputs: list[list[int]] = [[] for _ in sources]
    nonempty = [i for i, ids in enumerate(sources) if ids]
    lengths = [len(sources[i]) for i in nonempty]
    with torch.inference_mode():
        for batch in make_batches(lengths, lengths, batch_tokens):
            rows = [sources[nonempty[j]] for j in batch]
            src = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
            for r, ids in enumerate(rows):
                src[r, : len(ids)] = torch.tensor(ids)
            limits = [math.floor(max_len_a * len(ids) + max_len_b) for ids in rows]
            out = model.generate(input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=beam_size,
                                 length_penalty=alpha, do_sample=False, max_new_tokens=max(limits) + 1,
                                 early_stopping=beam_size > 1)
            for j, limit, row in zip(batch, limits, out.tolist()):
                row = row[1:]
                row = row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID]
                outputs[nonempty[j]] = row[:limit]
    return outputs


def build_decoders(checkpoint: Path, folder: Path, threads: int) -> tuple[dict[str, Decoder], dict[str, str], object]:
    """The six decoders, and which length-penalty family each belongs to ("ours", "hf", "ct2")."""
    from transformers import MarianMTModel

    loaded = load_model([checkpoint])
    decode = loaded.config.decode
    a, b, tokens = decode.max_len_a, decode.max_len_b, decode.batch_tokens
    progress("deploy: exporting to Hugging Face and CTranslate2")
    export([checkpoint], folder / "hf", "hf")
    export([checkpoint], folder / "ct2", "ctranslate2")
    models = {"ours fp32": loaded.model.float().eval()}
    if has_native_bf16(torch.device("cpu")):
        models["ours bf16"] = load_model([checkpoint]).model.to(torch.bfloat16).eval()
    models["ours int8"] = quantize_int8(loaded.model)
    decoders: dict[str, Decoder] = {
        name: (lambda s, k, alpha, m=m: translate_ids(m, s, k, alpha, a, b, tokens)) for name, m in models.items()
    }
    marian = MarianMTModel.from_pretrained(folder / "hf").eval()
    decoders["HF exported"] = lambda s, k, alpha: hf_translate_ids(marian, s, k, alpha, a, b, tokens)
    for compute_type in ("float32", "int8"):
        ct2 = CTranslate2Model(folder / "ct2", compute_type, threads)
        decoders[f"CT2 {compute_type}"] = lambda s, k, alpha, m=ct2: m.translate_ids(s, k, alpha, a, b, tokens)
    family = {name: "ours" if name.startswith("ours") else "hf" if name.startswith("HF") else "ct2" for name in decoders}
    return decoders, family, loaded


def bleu(tokenizer: Tokenizer, outputs: list[list[int]], references: Sequence[str]) -> float:
    """sacreBLEU (13a) of the detokenized outputs, as `transformer-evaluate` scores them."""
    return BLEU().corpus_score([tokenizer.decode(ids) for ids in outputs], [list(references)]).score


def timed(decoder: Decoder, sources: Sequence[Sequence[int]], beam_size: int, alpha: float) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = decoder(sources, beam_size, alpha)
    return out, time.perf_counter() - start


def run_deploy(args: argparse.Namespace) -> dict:
    """Greedy identity check, alphas on validation, then timed beam search on the test set."""
    checkpoint = Path(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder:  # the exports are loaded into memory
        decoders, family, loaded = build_decoders(checkpoint, Path(folder), torch.get_num_threads())
    tokenizer = loaded.src_tokenizer
    splits = {split: load_split(loaded.config.data, split) for split in ("valid", "test")}
    sources = {split: source_ids(tokenizer, src[: args.deploy_sentences]) for split, (src, _) in splits.items()}
    refs = {split: ref[: args.deploy_sentences] for split, (_, ref) in splits.items()}
    results: dict = {"checkpoint": str(checkpoint), "sentences": {k: len(v) for k, v in sources.items()},
                     "beam_size": args.beam_size}

    progress("deploy: greedy identity check on the test set")
    greedy = {name: decoders[name](sources["test"], 1, 1.0) for name in ("ours fp32", "HF exported", "CT2 float32")}
    results["greedy"] = {
        name: {"bleu": bleu(tokenizer, out, refs["test"]),
               "identical_to_ours": sum(x == y for x, y in zip(out, greedy["ours fp32"]))}
        for name, out in greedy.items()
    }

    grids = {"ours": args.alphas_ours, "hf": args.alphas_length, "ct2": args.alphas_length}
    tuned_on = {"ours": "ours fp32", "hf": "HF exported", "ct2": "CT2 float32"}
    results["alpha"] = {}
    for fam, name in tuned_on.items():
        scores = {}
        for alpha in grids[fam]:
            progress(f"deploy: validation, {name}, beam {args.beam_size}, alpha {alpha}")
            scores[alpha] = bleu(tokenizer, decoders[name](sources["valid"], args.beam_size, alpha), refs["valid"])
        best = max(scores, key=lambda x: scores[x])
        results["alpha"][fam] = {"tuned_on": name, "valid_bleu": {str(k): v for k, v in scores.items()}, "best": best}

    names = list(decoders)
    times: dict[str, list[float]] = {name: [] for name in names}
    test_bleu: dict[str, float] = {}
    for r in range(args.deploy_repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            alpha = results["alpha"][family[name]]["best"]
            progress(f"deploy: test pass {r + 1}, {name}, beam {args.beam_size}, alpha {alpha}")
            out, seconds = timed(decoders[name], sources["test"], args.beam_size, alpha)
            times[name].append(seconds)
            test_bleu.setdefault(name, bleu(tokenizer, out, refs["test"]))
    n = len(sources["test"])
    results["beam"] = {name: {"alpha": results["alpha"][family[name]]["best"], "bleu": test_bleu[name],
                              "seconds": times[name], "sentences_per_s": n / statistics.median(times[name])}
                       for name in names}
    if args.profile:
        results["profile"] = {name: profile_ours(decoders[name], sources["test"][: args.profile], args.beam_size,
                                                 results["alpha"]["ours"]["best"]) for name in ("ours fp32", "ours int8")}
    return results


def profile_ours(decoder: Decoder, sources: Sequence[Sequence[int]], beam_size: int, alpha: float) -> str:
    """Where beam search spends its time: torch.profiler's operator table, by self CPU time."""
    decoder(sources[:16], beam_size, alpha)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decoder(sources, beam_size, alpha)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)


def report_deploy(results: dict) -> list[str]:
    """Markdown lines of the deploy section."""
    d = results["deploy"]
    out = ["", f"Real decoding with {d['checkpoint']} ({d['sentences']['test']} test sentences):", "",
           "Greedy search (identity check against ours in float32):", "",
           table(["decoder", "BLEU", "outputs identical to ours"],
                 [[name, f"{r['bleu']:.2f}", f"{r['identical_to_ours']} / {d['sentences']['test']}"]
                  for name, r in d["greedy"].items()])]
    rows = [[fam, r["tuned_on"], ", ".join(f"{k}: {v:.2f}" for k, v in r["valid_bleu"].items()), r["best"]]
            for fam, r in d["alpha"].items()]
    out += ["", f"Length penalty alpha on validation ({d['sentences']['valid']} sentences, beam {d['beam_size']}; "
            "ours: GNMT ((5+|Y|)/6)^alpha, hf and ct2: |Y|^alpha):", "",
            table(["penalty of", "tuned with", "validation BLEU per alpha", "chosen"], rows)]
    beam = d["beam"]
    out += ["", f"Beam {d['beam_size']} on the test set, each decoder with its alpha (sentences/s: median over "
            f"{len(next(iter(beam.values()))['seconds'])} interleaved passes):", "",
            table(["decoder", "alpha", "test BLEU", "sentences/s"],
                  [[name, r["alpha"], f"{r['bleu']:.2f}", f"{r['sentences_per_s']:.1f}"] for name, r in beam.items()])]
    names = list(beam)
    rows = [[row] + [f"{beam[row]['sentences_per_s'] / beam[col]['sentences_per_s']:.2f}" for col in names]
            for row in names]
    out += ["", "Speed ratios (row / column, sentences/s):", "", table(["row / column"] + names, rows)]
    for name, profile in d.get("profile", {}).items():
        out += ["", f"{name}, beam search, operators by self CPU time:", "", "```", profile, "```"]
    return out
