"""An English caption language model from `transformer.model.TransformerLM`, trained on Multi30k.

    python examples/language_model.py                      # about a minute on 2 CPU cores
    transformer-generate runs/caption_lm/lm.pt --prompt "A dog" --num 3 --top-p 0.9

Trains a SentencePiece vocabulary and a small decoder-only Transformer on the 29,000 English
training captions, reports the validation perplexity per token (end-of-sentence included), prints
sampled captions and saves a checkpoint that `transformer-generate` reads.

`--init-from CHECKPOINT` starts the language model from a trained translation model's decoder
(its embedding, and in each layer the self-attention, the feed-forward network and their norms;
the cross-attention has nothing to attend to here and is left out), with that model's target
tokenizer and sizes, and trains the same model from scratch beside it for comparison.

`--compare` also trains a peer of the same size built from PyTorch's own modules
(`nn.TransformerEncoder` with a causal mask) on the same batches for the same steps, for each
`--seeds`, and prints both perplexities and the ratio of training speeds.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.checkpoint import CheckpointError, load_model
from transformer.model import TransformerLM, sinusoidal_table
from multi30k_text import BOS_ID, EOS_ID, PAD_ID, read_lines, train_tokenizer  # examples/multi30k_text.py


def make_batches(sequences: list[list[int]], batch_size: int, rng: random.Random) -> list[Tensor]:
    """Right-padded (B, L) batches of similar lengths, in random order: each block of 50 batches is
    sorted by length before it is cut, so that little of a batch is padding."""
    order = list(range(len(sequences)))
    rng.shuffle(order)
    block = 50 * batch_size
    batches = []
    for start in range(0, len(order), block):
        chunk = sorted(order[start : start + block], key=lambda i: len(sequences[i]))
        for b in range(0, len(chunk), batch_size):
            rows = [sequences[i] for i in chunk[b : b + batch_size]]
            batch = torch.full((len(rows), max(map(len, rows))), PAD_ID)
            for r, row in enumerate(rows):
                batch[r, : len(row)] = torch.tensor(row)
            batches.append(batch)
    rng.shuffle(batches)
    return batches


class TorchCausalLM(nn.Module):
    """The peer: the same model from PyTorch's modules (nn.TransformerEncoder with a causal mask),
    the same scaled embedding, sinusoidal positions and tied output projection."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.register_buffer("positions", sinusoidal_table(1024, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, V) next-token logits."""
        T = tokens.size(1)
        x = self.dropout(self.embed(tokens) * math.sqrt(self.embed.embedding_dim) + self.positions[:T])
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        return F.linear(self.encoder(x, mask=causal, is_causal=True), self.embed.weight)


def lm_loss(model: nn.Module, batch: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the real target tokens of a [BOS] ... [EOS] batch, and their count."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="sum")
    return loss, int(targets.ne(PAD_ID).sum())


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[Tensor]) -> float:
    """exp(mean negative log-likelihood per token), every caption token and EOS predicted (BOS is given)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = lm_loss(model, batch)
        total, count = total + float(loss), count + n
    model.train()
    return math.exp(total / count)


def train(model: nn.Module, batches: list[Tensor], steps: int, lr: float, warmup: int) -> float:
    """Adam with a linear warm-up and a linear decay to zero over `steps`; returns training tokens/s."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup)))
    )
    model.train()
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss, n = lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss / n).backward()
        optimizer.step()
        schedule.step()
        tokens += n
    return tokens / (time.perf_counter() - start)


def lm_from_translation(path: Path, dropout: float) -> tuple[TransformerLM, spm.SentencePieceProcessor, dict]:
    """A `TransformerLM` built from a trained translation model's decoder, with its target
    tokenizer and the constructor settings (for `save` and a from-scratch twin)."""
    try:
        loaded = load_model([path])  # weights_only: loading runs no code from the file
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"language_model.py: --init-from {str(e).splitlines()[0]}") from None
    c, translation = loaded.config.model, loaded.model
    settings = dict(vocab_size=loaded.tgt_tokenizer.vocab_size, d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff,
                    n_layers=c.n_decoder_layers, dropout=dropout, attention_dropout=c.attention_dropout,
                    norm_first=c.norm_first, activation=c.activation, positional=c.positional, max_len=c.max_len,
                    pad_id=PAD_ID)
    lm = TransformerLM(**settings)
    lm.embed.load_state_dict(translation.tgt_embed.state_dict())  # also the tied output projection
    lm.positions.load_state_dict(translation.positions.state_dict())
    for mine, theirs in zip(lm.decoder.layers, translation.decoder.layers):
        # A layer without cross-attention has two norms: after self-attention, after the feed-forward.
        for name, source in (("self_attn", "self_attn"), ("ff", "ff"), ("norm1", "norm1"), ("norm2", "norm3")):
            getattr(mine, name).load_state_dict(getattr(theirs, source).state_dict())
    if lm.decoder.norm is not None:
        lm.decoder.norm.load_state_dict(translation.decoder.norm.state_dict())
    return lm, loaded.tgt_tokenizer.processor, settings


def save(path: Path, model: TransformerLM, settings: dict, tokenizer: spm.SentencePieceProcessor) -> None:
    """Write weights, constructor settings and tokenizer to one file, atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = torch.frombuffer(bytearray(tokenizer.serialized_model_proto()), dtype=torch.uint8)
    tmp = path.with_suffix(".tmp")
    torch.save({"settings": settings, "model": model.state_dict(), "tokenizer": proto}, tmp)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"),
                        help="folder with train.en.gz and val.en.gz (default: ../shared/data/multi30k)")
    parser.add_argument("--output", type=Path, default=Path("runs/caption_lm/lm.pt"), help="checkpoint to write")
    parser.add_argument("--train-sentences", type=int, default=0, help="use the first N captions only (0: all)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64, help="captions per step")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compare", action="store_true", help="also train the nn.TransformerEncoder peer")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="a translation checkpoint whose decoder starts the model (and a from-scratch twin)")
    parser.add_argument("--init-lr", type=float, default=5e-4, help="peak learning rate of the initialised model")
    parser.add_argument("--samples", type=int, default=5, help="captions to sample at the end")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    train_text = read_lines(args.data_dir / "train.en.gz", args.train_sentences)
    valid_text = read_lines(args.data_dir / "val.en.gz")
    if args.init_from is not None:
        initialised, tokenizer, settings = lm_from_translation(args.init_from, args.dropout)
    else:
        tokenizer = train_tokenizer(train_text, args.vocab_size)
        settings = dict(vocab_size=tokenizer.get_piece_size(), d_model=args.d_model, n_heads=args.n_heads,
                        d_ff=args.d_ff, n_layers=args.n_layers, dropout=args.dropout, pad_id=PAD_ID)
    V = tokenizer.get_piece_size()
    train_ids = [[BOS_ID, *ids, EOS_ID] for ids in tokenizer.encode(train_text)]
    valid_ids = [[BOS_ID, *ids, EOS_ID] for ids in tokenizer.encode(valid_text)]
    valid_batches = make_batches(valid_ids, 256, random.Random(0))
    print(f"{len(train_ids)} training captions, {sum(map(len, train_ids))} tokens; vocabulary {V} "
          f"(uniform perplexity {V}, ln V = {math.log(V):.2f})")

    builders = {"TransformerLM": (lambda: TransformerLM(**settings), args.lr)}
    if args.init_from is not None:
        builders = {f"from {args.init_from.name}": (lambda: copy.deepcopy(initialised), args.init_lr),
                    "TransformerLM": builders["TransformerLM"]}
    if args.compare:
        builders["nn.TransformerEncoder"] = (lambda: TorchCausalLM(
            V, settings["d_model"], settings["n_heads"], settings["d_ff"], settings["n_layers"], args.dropout), args.lr)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
    for seed in args.seeds:
        batches = make_batches(train_ids, args.batch_size, random.Random(seed))
        for name, (build, lr) in builders.items():
            torch.manual_seed(seed)
            model = build()
            initial = perplexity(model, valid_batches)
            tokens_per_s = train(model, batches, args.steps, lr, args.warmup)
            ppl = perplexity(model, valid_batches)
            results[name].append((ppl, tokens_per_s))
            print(f"seed {seed} {name:22s} valid perplexity {initial:7.1f} -> {ppl:6.2f} "
                  f"(loss {math.log(ppl):.3f}); {tokens_per_s:6.0f} training tokens/s")
            if seed == args.seeds[0] and name == next(iter(builders)):
                lm = model
    for name, runs in results.items():
        if runs:
            ppls = [p for p, _ in runs]
            print(f"{name:22s} valid perplexity mean {statistics.mean(ppls):.2f} "
                  f"(range {min(ppls):.2f}-{max(ppls):.2f}) over {len(runs)} seed(s)")
    if args.compare:
        ratios = [ours[1] / peer[1] for ours, peer in zip(results["TransformerLM"], results["nn.TransformerEncoder"])]
        print(f"training tokens/s, TransformerLM / nn.TransformerEncoder: median {statistics.median(ratios):.2f}x "
              f"(per seed: {', '.join(f'{r:.2f}' for r in ratios)})")

    save(args.output, lm, settings, tokenizer)
    print(f"saved {args.output}")
    lm.eval()
    prompt = torch.full((args.samples, 1), BOS_ID)
    sampled = lm.generate(prompt, 40, EOS_ID, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    greedy = lm.generate(prompt[:1], 40, EOS_ID, temperature=0.0)
    print("greedy:  ", tokenizer.decode([t for t in greedy[0, 1:].tolist() if t not in (PAD_ID, EOS_ID)]))
    for row in sampled:
        print("sampled: ", tokenizer.decode([t for t in row[1:].tolist() if t not in (PAD_ID, EOS_ID)]))


if __name__ == "__main__":
    main()
