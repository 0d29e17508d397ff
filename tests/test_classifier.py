"""The encoder classifier: pooling over real tokens only, and the head on the encoder's output."""

import pytest
import torch
import torch.nn.functional as F

from transformer.model import EncoderClassifier

PAD = 0


def tiny(pooling: str) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(30, 3, d_model=16, n_heads=2, d_ff=32, n_layers=2, pooling=pooling).double().eval()


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_padding_does_not_change_the_logits(pooling):
    model = tiny(pooling)
    tokens = torch.randint(4, 30, (3, 7))
    tokens[1, 5:] = PAD
    tokens[2, 2:] = PAD
    with torch.no_grad():
        reference = model(tokens)
        torch.testing.assert_close(model(F.pad(tokens, (0, 3), value=PAD)), reference, atol=1e-12, rtol=0)
        torch.testing.assert_close(model(tokens[2:, :2]), reference[2:], atol=1e-12, rtol=0)
    assert reference.shape == (3, 3)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_pooling_reads_the_encoder_output(pooling):
    model = tiny(pooling)
    tokens = torch.randint(4, 30, (2, 6))
    tokens[1, 4:] = PAD
    with torch.no_grad():
        hidden = model.encoder(model.embed(tokens, model.positions(6)), tokens.eq(PAD))
        pooled = hidden[:, 0] if pooling == "first" else torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        torch.testing.assert_close(model(tokens), model.head(pooled), atol=1e-12, rtol=0)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'first', got 'max'"):
        EncoderClassifier(30, 2, d_model=16, n_heads=2, d_ff=32, n_layers=1, pooling="max")


def test_attention_learns_what_a_bag_of_tokens_cannot_tell():
    """Whether the first and the last token are equal: the class-token position must attend to the last
    position and compare, which a bag of the same tokens cannot do. Measured: 99.9% after 100 steps."""
    torch.manual_seed(0)
    model = EncoderClassifier(12, 2, d_model=32, n_heads=2, d_ff=64, n_layers=1, dropout=0.0, pooling="first")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(4, 12, (n, 6), generator=generator)
        labels = torch.randint(0, 2, (n,), generator=generator)
        same = labels.bool()
        tokens[same, -1] = tokens[same, 0]
        shift = torch.randint(1, 8, (int((~same).sum()),), generator=generator)
        tokens[~same, -1] = 4 + (tokens[~same, 0] - 4 + shift) % 8  # any other token
        return tokens, labels

    for _ in range(150):
        tokens, labels = batch(128)
        loss = F.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, labels = batch(2000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = model.eval()(tokens).argmax(-1).eq(labels).float().mean()
    assert accuracy > 0.95
