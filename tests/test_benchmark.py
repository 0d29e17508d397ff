"""scripts/benchmark.py: its FLOP count against FlopCounterMode, and equal work on both sides of a comparison."""

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from transformer.config import Config, ModelConfig
from transformer.data.batches import Batch
from transformer.data.tokenizer import PAD_ID
from transformer.model import Transformer
from transformer.training.loss import TranslationLoss

V, D, H, F, N_ENC, N_DEC = 40, 16, 2, 24, 2, 3


def load_benchmark():
    """scripts/benchmark.py, which puts the section modules beside it on sys.path."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


benchmark = load_benchmark()
import bench_decode  # noqa: E402 (on sys.path once benchmark.py is loaded)
import bench_train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def padded_batch() -> Batch:
    """Three pairs of different lengths, right-padded, with source and target widths that differ."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, V, (3, 7), generator=generator)
    src[1, 5:] = PAD_ID
    src[2, 3:] = PAD_ID
    tgt_in = torch.randint(4, V, (3, 5), generator=generator)
    tgt_in[0, 4:] = PAD_ID
    tgt_in[2, 2:] = PAD_ID
    tgt_out = tgt_in.roll(-1, dims=1)
    tgt_out[tgt_in.eq(PAD_ID)] = PAD_ID
    return Batch(src, tgt_in, tgt_out, int(src.ne(PAD_ID).sum()), int(tgt_out.ne(PAD_ID).sum()))


@pytest.mark.parametrize("ours", [True, False])
def test_training_flops_match_flop_counter(ours):
    torch.manual_seed(0)
    if ours:
        trainer = TranslationLoss(Transformer(V, V, D, H, F, N_ENC, N_DEC, share_embeddings=True), 0.1)
    else:
        trainer = bench_train.TorchTransformerLoss(V, D, H, F, N_ENC, N_DEC)
    batch = padded_batch()
    B, S = batch.src.shape
    T = batch.tgt_in.size(1)
    encoder_rows, logit_rows = (batch.n_src_tokens, batch.n_tgt_tokens) if ours else (B * S, B * T)
    analytic = bench_train.training_flops(B, S, T, encoder_rows, logit_rows, D, F, N_ENC, N_DEC, V)
    assert analytic == bench_train.batch_flops(Config(model=ModelConfig(d_model=D, n_heads=H, d_ff=F,
                                                                      n_encoder_layers=N_ENC, n_decoder_layers=N_DEC)),
                                             V, batch, ours)
    other_encoder = bench_train.training_flops(B, S, T, B * S + batch.n_src_tokens - encoder_rows, logit_rows, D, F,
                                             N_ENC, N_DEC, V)
    other_logits = bench_train.training_flops(B, S, T, encoder_rows, B * T + batch.n_tgt_tokens - logit_rows, D, F,
                                            N_ENC, N_DEC, V)
    counted = bench_train.counted_flops(trainer, batch)
    # Matmul FLOPs are whole numbers fixed by the shapes: the count must be exact, and counting the
    # encoder or the logits at the other set of positions must be detectably wrong.
    assert analytic == counted
    assert other_encoder != counted and other_logits != counted


def test_the_peak_matmul_is_timed_among_the_training_steps(monkeypatch):
    """One warm-up matmul, then one after every batch's steps in every repeat; not a model row."""
    calls = []
    make_run = bench_train.matmul_run

    def counting_run(n, dtype):
        run = make_run(n, dtype)
        return lambda i: calls.append(i) or run(i)

    monkeypatch.setattr(bench_train, "matmul_run", counting_run)
    torch.manual_seed(0)
    trainer = TranslationLoss(Transformer(V, V, D, H, F, N_ENC, N_DEC, share_embeddings=True), 0.1)
    results, peaks = bench_train.time_training({"ours": trainer}, [padded_batch(), padded_batch()], ["fp32"],
                                             repeats=2, warmup=1, peak_size=32)
    assert calls == [0, 0, 1, 0, 1]
    assert list(results["fp32"]) == ["ours"] and list(peaks) == ["fp32"] and peaks["fp32"] > 0
    calls.clear()
    results, peaks = bench_train.time_training({"ours": trainer}, [padded_batch()], ["fp32"], repeats=1, warmup=1,
                                             peak_size=0)
    assert calls == [] and peaks == {} and list(results["fp32"]) == ["ours"]


def test_peer_has_our_parameters():
    """Same matrices on both sides; nn.Transformer only adds a final LayerNorm per stack."""
    ours = Transformer(V, V, D, H, F, N_ENC, N_DEC, share_embeddings=True)
    peer = bench_train.TorchTransformerLoss(V, D, H, F, N_ENC, N_DEC)
    assert n_parameters(peer) - n_parameters(ours) == 2 * 2 * D


def test_decoders_run_the_same_number_of_steps():
    """Ours (with and without cache) and Hugging Face's decoder each run the source width S steps."""
    cfg = Config(model=ModelConfig(d_model=D, n_heads=H, d_ff=F, n_encoder_layers=1, n_decoder_layers=1))
    src = padded_batch().src
    S = bench_decode.steps_for(src)

    torch.manual_seed(0)
    ours = Transformer.from_config(cfg.model, V, V, PAD_ID).eval()
    calls = []
    decode_hidden = ours.decode_hidden
    ours.decode_hidden = lambda tgt, *args: calls.append(tgt.shape) or decode_hidden(tgt, *args)
    bench_decode.decode_ours(ours, src, beam_size=2, use_cache=True)
    # The first step decodes one row per sentence (its beam rows are the same BOS prefix).
    rows = [src.size(0)] + [src.size(0) * 2] * (S - 1)
    assert [shape[0] for shape in calls] == rows and all(shape[1] == 1 for shape in calls)
    calls.clear()
    bench_decode.decode_ours(ours, src, beam_size=2, use_cache=False)
    assert [shape[1] for shape in calls] == list(range(1, S + 1))

    marian = bench_decode.hf_marian(cfg, V)
    hf_calls = []
    marian.model.decoder.register_forward_pre_hook(lambda module, args: hf_calls.append(1))
    bench_decode.decode_hf(marian, src, beam_size=2)
    assert len(hf_calls) == S


def test_ctranslate2_and_int8_decoders_run_the_same_number_of_steps(tmp_path):
    """CTranslate2 (our random model, converted) decodes S tokens per sentence, as ours and int8 ours do."""
    from transformer.config import TokenizerConfig
    from transformer.data.tokenizer import train_tokenizer

    words = "ein mann eine frau kind hund spielt läuft im park auf der straße".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(60)]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=V), tmp_path / "spm")
    cfg = Config(model=ModelConfig(d_model=D, n_heads=H, d_ff=F, n_encoder_layers=1, n_decoder_layers=1, max_len=32,
                                   share_embeddings=True))
    setup = bench_decode.Setup(V, [], [], tokenizer)
    src = padded_batch().src
    S = bench_decode.steps_for(src)
    folder = bench_decode.ct2_model(cfg, setup, Transformer.from_config(cfg.model, V, V, PAD_ID), tmp_path)
    model = bench_decode.CTranslate2Model(folder, "int8", threads=1)
    translator, found = model.translator, []

    class Recording:  # the benchmark's own call, with the hypotheses it gets
        def translate_batch(self, *args, **kwargs):
            found.extend(translator.translate_batch(*args, **kwargs))

    model.translator = Recording()
    bench_decode.decode_ct2(model, src, beam_size=2)
    assert [len(r.hypotheses[0]) for r in found] == [S] * src.size(0)
    before = set(Path(tempfile.gettempdir()).glob("bench-ct2-*"))
    runs = bench_decode.decoders(cfg, setup, 2, ["ours (cache, int8)", "CT2 int8"])
    assert all(run(src) > 0 for run in runs.values())
    assert set(Path(tempfile.gettempdir()).glob("bench-ct2-*")) == before  # the converted model is not left behind
