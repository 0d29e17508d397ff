"""Tell true German-English translation pairs from mismatched ones with `transformer.model.EncoderClassifier`.

    python examples/classify_pairs.py                      # ~4 minutes on 2 CPU cores

A bitext-filtering task on Multi30k: every German caption gives a positive example, itself with
its English translation, and a negative, itself with the English caption of another image whose
length is close to that of its own translation, so that length alone tells nothing. The input is
`[BOS] German [EOS] English [EOS]` in a joint SentencePiece vocabulary. An encoder classifier
(self-attention lets German and English tokens look at each other) and a bag-of-embeddings
baseline (the mean of the token embeddings into a two-layer network) are trained the same way
(same batches, steps, optimiser and schedule) and their accuracies reported on pairs built from
test_2016_flickr (validation pairs are reported alongside, for tuning).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.model import EncoderClassifier, TokenEmbedding
from multi30k_text import BOS_ID, EOS_ID, PAD_ID, read_lines, train_tokenizer  # examples/multi30k_text.py


def make_pairs(german: list[list[int]], english: list[list[int]], rng: random.Random) -> list[tuple[list[int], int]]:
    """Each German sentence once with its translation (label 1) and once with the English sentence
    next to its translation in length order (label 0): a mismatch of about the same length."""
    by_length = sorted(range(len(english)), key=lambda i: (len(english[i]), rng.random()))
    examples = []
    for rank, i in enumerate(by_length):
        j = by_length[rank + 1] if rank + 1 < len(by_length) else by_length[rank - 1]
        for other, label in ((i, 1), (j, 0)):
            examples.append(([BOS_ID, *german[i], EOS_ID, *english[other], EOS_ID], label))
    rng.shuffle(examples)
    return examples


def make_batches(examples: list[tuple[list[int], int]], batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Right-padded (B, L) token batches and (B,) labels, in the order given."""
    batches = []
    for b in range(0, len(examples), batch_size):
        rows = examples[b : b + batch_size]
        tokens = torch.full((len(rows), max(len(t) for t, _ in rows)), PAD_ID)
        for r, (ids, _) in enumerate(rows):
            tokens[r, : len(ids)] = torch.tensor(ids)
        batches.append((tokens, torch.tensor([label for _, label in rows])))
    return batches


class BagOfEmbeddings(nn.Module):
    """The baseline: the mean of the token embeddings (no positions, no attention), then a
    two-layer network; the same front end and width as the encoder classifier."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model, dropout, PAD_ID)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 2))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) -> (B, 2) logits."""
        real = tokens.ne(PAD_ID).unsqueeze(-1)
        x = self.embed(tokens, torch.zeros(()))  # a bag: no positions; padding rows are zero
        return self.head(x.sum(1) / real.sum(1))


def train(model: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int, lr: float, warmup: int) -> float:
    """Adam with a linear warm-up and a linear decay to zero over `steps`; returns the seconds taken."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup)))
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        tokens, labels = batches[step % len(batches)]
        loss = F.cross_entropy(model(tokens), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Fraction of pairs classified correctly."""
    model.eval()
    correct = sum(int(model(tokens).argmax(-1).eq(labels).sum()) for tokens, labels in batches)
    model.train()
    return correct / sum(len(labels) for _, labels in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"),
                        help="folder with {train,val,test_2016_flickr}.{de,en}.gz (default: ../shared/data/multi30k)")
    parser.add_argument("--train-sentences", type=int, default=0, help="use the first N pairs only (0: all)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--pooling", choices=("mean", "first"), default="mean")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = {name: (read_lines(args.data_dir / f"{name}.de.gz", args.train_sentences if name == "train" else 0),
                     read_lines(args.data_dir / f"{name}.en.gz", args.train_sentences if name == "train" else 0))
              for name in ("train", "val", "test_2016_flickr")}
    tokenizer = train_tokenizer(splits["train"][0] + splits["train"][1], args.vocab_size)
    rng = random.Random(args.seed)
    batches = {name: make_batches(make_pairs(tokenizer.encode(de), tokenizer.encode(en), rng), args.batch_size)
               for name, (de, en) in splits.items()}
    print(f"{sum(len(b[1]) for b in batches['train'])} training pairs (half of them mismatched), "
          f"{sum(len(b[1]) for b in batches['test_2016_flickr'])} test pairs; vocabulary {tokenizer.get_piece_size()}")

    V = tokenizer.get_piece_size()
    models = {
        "encoder classifier": lambda: EncoderClassifier(
            V, 2, args.d_model, args.n_heads, args.d_ff, args.n_layers, args.dropout, pooling=args.pooling,
            pad_id=PAD_ID),
        "bag of embeddings": lambda: BagOfEmbeddings(V, args.d_model, args.dropout),
    }
    scores = {}
    for name, build in models.items():
        torch.manual_seed(args.seed)
        model = build()
        seconds = train(model, batches["train"], args.steps, args.lr, args.warmup)
        scores[name] = accuracy(model, batches["test_2016_flickr"])
        print(f"{name:18s} accuracy: valid {accuracy(model, batches['val']):.1%}, test {scores[name]:.1%} "
              f"({args.steps} steps in {seconds:.0f} s)")
    gain = scores["encoder classifier"] - scores["bag of embeddings"]
    print(f"attention over bag of embeddings: {100 * gain:+.1f} points of test accuracy")


if __name__ == "__main__":
    main()
