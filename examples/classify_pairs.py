"""Tell true German-English translation pairs from mismatched ones with `transformer.model.EncoderClassifier`.

    python examples/classify_pairs.py                      # a few minutes on 2 CPU cores
    python examples/classify_pairs.py --init-from none     # the classifier from scratch, its own tokenizer

A bitext-filtering task on Multi30k: every German caption gives a positive example, itself with
its English translation, and a negative, itself with the English caption of another image whose
length is close to that of its own translation, so that length alone tells nothing. The input is
`[BOS] German [EOS] English [EOS]` in a joint SentencePiece vocabulary. An encoder classifier
(self-attention lets German and English tokens look at each other) and a bag-of-embeddings
baseline (the mean of the token embeddings into a two-layer network) are trained the same way
(same batches, steps, optimiser and schedule) and their accuracies reported on pairs built from
test_2016_flickr (validation pairs are reported alongside, for tuning).

By default the classifier starts from a trained German->English translation model
(`--init-from`, the README's Multi30k run): its embedding and encoder are copied into the
classifier and the checkpoint's joint tokenizer is used for every model, so that only the
classification head starts from random; that head learns at its own, higher rate (`--init-head-lr`).
`--also-from-scratch` trains the same classifier from random weights beside it.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.checkpoint import CheckpointError, load_model
from transformer.model import EncoderClassifier, TokenEmbedding
from multi30k_text import BOS_ID, EOS_ID, PAD_ID, read_lines, train_tokenizer  # examples/multi30k_text.py

TRANSLATION_CHECKPOINT = Path("runs/multi30k_de_en/checkpoints/final.pt")  # where the README's first command writes it
ENCODER_SIZES = ("d_model", "n_heads", "d_ff", "n_layers")


class InitError(ValueError):
    """A translation checkpoint that cannot give this classifier its encoder."""


def classifier_from_translation(
    path: Path, n_classes: int, pooling: str, dropout: float, sizes: dict[str, int | None]
) -> tuple[EncoderClassifier, spm.SentencePieceProcessor, dict[str, int]]:
    """An `EncoderClassifier` whose embedding, positions and encoder are those of a trained
    translation model, with the model's tokenizer and its encoder's sizes; only the classification
    head is new.

    Args:
        sizes: sizes asked for on the command line (None: not asked); each must be the checkpoint's.
    """
    try:
        loaded = load_model([path])  # weights_only: loading runs no code from the file
    except (CheckpointError, OSError) as e:
        raise InitError(str(e).splitlines()[0]) from None
    config, translation = loaded.config.model, loaded.model
    if not loaded.config.tokenizer.joint:
        raise InitError(f"{path}: its tokenizer is not joint (tokenizer.joint: false), and a pair's German and "
                        "English pieces need one vocabulary")
    found = {"d_model": config.d_model, "n_heads": config.n_heads, "d_ff": config.d_ff,
             "n_layers": config.n_encoder_layers}
    wrong = [f"--{name.replace('_', '-')} {sizes[name]} (the checkpoint's encoder has {found[name]})"
             for name in ENCODER_SIZES if sizes[name] is not None and sizes[name] != found[name]]
    if wrong:
        raise InitError(f"{path}: does not fit " + ", ".join(wrong))
    classifier = EncoderClassifier(
        loaded.src_tokenizer.vocab_size, n_classes, config.d_model, config.n_heads, config.d_ff,
        config.n_encoder_layers, dropout, config.attention_dropout, config.norm_first, config.activation,
        config.positional, config.max_len, pooling=pooling, pad_id=PAD_ID)
    # The same modules on both sides: copy them over, module by module.
    classifier.embed.load_state_dict(translation.src_embed.state_dict())
    classifier.positions.load_state_dict(translation.positions.state_dict())
    classifier.encoder.load_state_dict(translation.encoder.state_dict())
    return classifier, loaded.src_tokenizer.processor, found


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


def parameter_groups(model: nn.Module, lr: float, head_lr: float | None) -> list[dict]:
    """Adam's parameter groups: everything at `lr`, or, with `head_lr`, the model's `head` at
    `head_lr` and the rest at `lr` (a new head beside trained layers learns faster than the layers
    may move)."""
    if head_lr is None:
        return [{"params": list(model.parameters()), "lr": lr}]
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}]


def train(model: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int, groups: list[dict], warmup: int) -> float:
    """Adam over `groups` (see `parameter_groups`), each group's learning rate with a linear warm-up
    and a linear decay to zero over `steps`; returns the seconds taken."""
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.98), eps=1e-9)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"),
                        help="folder with {train,val,test_2016_flickr}.{de,en}.gz (default: ../shared/data/multi30k)")
    parser.add_argument("--init-from", default=str(TRANSLATION_CHECKPOINT),
                        help="a de->en translation checkpoint whose embedding and encoder start the classifier, "
                             f"or 'none' (default: {TRANSLATION_CHECKPOINT}; from scratch, with a note, when absent)")
    parser.add_argument("--also-from-scratch", action="store_true",
                        help="with --init-from, also train the same classifier from random weights")
    parser.add_argument("--train-sentences", type=int, default=0, help="use the first N pairs only (0: all)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="the tokenizer trained without --init-from")
    parser.add_argument("--d-model", type=int, default=None, help="default: the checkpoint's, or 128 from scratch")
    parser.add_argument("--n-heads", type=int, default=None, help="default: the checkpoint's, or 4")
    parser.add_argument("--d-ff", type=int, default=None, help="default: the checkpoint's, or 512")
    parser.add_argument("--n-layers", type=int, default=None, help="default: the checkpoint's encoder layers, or 2")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--pooling", choices=("mean", "first"), default="mean")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the models trained from scratch")
    parser.add_argument("--init-lr", type=float, default=5e-4, help="peak learning rate of the initialised classifier")
    parser.add_argument("--init-head-lr", type=float, default=5e-3,
                        help="peak learning rate of the initialised classifier's new linear head")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    init = None if args.init_from.lower() == "none" else Path(args.init_from)
    if init is not None and not init.exists() and args.init_from == str(TRANSLATION_CHECKPOINT):
        print(f"no {init}: make it with `transformer-train --config configs/multi30k_de_en.yaml` "
              "(about 20 minutes on 2 cores) to start from a trained encoder; training from scratch")
        init = None

    splits = {name: (read_lines(args.data_dir / f"{name}.de.gz", args.train_sentences if name == "train" else 0),
                     read_lines(args.data_dir / f"{name}.en.gz", args.train_sentences if name == "train" else 0))
              for name in ("train", "val", "test_2016_flickr")}
    sizes = {name: getattr(args, name) for name in ENCODER_SIZES}
    models: dict[str, tuple] = {}  # name -> (build, peak learning rate, the head's if another)
    if init is not None:
        try:
            initialised, tokenizer, sizes = classifier_from_translation(init, 2, args.pooling, args.dropout, sizes)
        except InitError as e:
            raise SystemExit(f"classify_pairs.py: --init-from {e}") from None
        models[f"encoder classifier from {init.name}"] = (lambda: initialised, args.init_lr, args.init_head_lr)
    else:
        tokenizer = train_tokenizer(splits["train"][0] + splits["train"][1], args.vocab_size)
        sizes = {name: value if value is not None else default
                 for (name, value), default in zip(sizes.items(), (128, 4, 512, 2))}
    V = tokenizer.get_piece_size()
    if init is None or args.also_from_scratch:
        models["encoder classifier from scratch"] = (lambda: EncoderClassifier(
            V, 2, sizes["d_model"], sizes["n_heads"], sizes["d_ff"], sizes["n_layers"], args.dropout,
            pooling=args.pooling, pad_id=PAD_ID), args.lr, None)
    models["bag of embeddings"] = (lambda: BagOfEmbeddings(V, sizes["d_model"], args.dropout), args.lr, None)

    rng = random.Random(args.seed)
    batches = {name: make_batches(make_pairs(tokenizer.encode(de), tokenizer.encode(en), rng), args.batch_size)
               for name, (de, en) in splits.items()}
    print(f"{sum(len(b[1]) for b in batches['train'])} training pairs (half of them mismatched), "
          f"{sum(len(b[1]) for b in batches['test_2016_flickr'])} test pairs; vocabulary {V}")
    scores = {}
    for name, (build, lr, head_lr) in models.items():
        torch.manual_seed(args.seed)
        model = build()
        seconds = train(model, batches["train"], args.steps, parameter_groups(model, lr, head_lr), args.warmup)
        scores[name] = accuracy(model, batches["test_2016_flickr"])
        print(f"{name:34s} accuracy: valid {accuracy(model, batches['val']):.1%}, test {scores[name]:.1%} "
              f"({args.steps} steps in {seconds:.0f} s)")
    best = next(iter(scores))
    gain = scores[best] - scores["bag of embeddings"]
    print(f"{best} over bag of embeddings: {100 * gain:+.1f} points of test accuracy")


if __name__ == "__main__":
    main()
