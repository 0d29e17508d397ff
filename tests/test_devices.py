"""The same code on every device: the CPU always, and CUDA where there is a GPU.

Each test takes the `device` fixture (or a parameter list built from `DEVICES`), so a GPU machine
runs them on both. On a machine without a GPU every CUDA case is reported as skipped, with the
reason "no CUDA GPU on this machine: not run" (`pytest -rs` lists them), and the CPU cases run.
Checks:

* the full Transformer's forward pass, input and parameter gradients, and `TranslationLoss`, in
  float64 on the device against the same weights on the CPU, whose short attention takes the
  written-out path (CUDA, and the CPU run here, take F.scaled_dot_product_attention);
* `Dropout` (our CPU mask, `F.dropout` elsewhere): kept elements x / (1 - p) rounded once in x's
  dtype, the drop rate, and a gradient that is the forward's mask times the scale;
* beam and greedy search with and without the key/value cache, against each other and the CPU;
* noisy-channel reranking: the reverse model's scores and the reranked choices, against the CPU;
* one short training run per device and precision through `transformer-train`'s entry point, and
  its checkpoint loaded back with `transformer.checkpoint.load_model` and used on the device;
* on CUDA, the synchronisations a training step makes (`torch.cuda.set_sync_debug_mode`), counted
  per step in each precision: one, the read that decides the update;
* with two GPUs, a data-parallel step of two processes over NCCL, counted inside each rank.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONFIG,
    MAX_STEPS,
    ROOT,
    free_port,
    overrides,
    process_state_kept,
    random_model,
    random_source,
    run_module,
)

import transformer.model.attention as attention_module
from transformer.checkpoint import load_checkpoint, load_model, run_checkpoints
from transformer.config import load_config
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.rerank import ChannelReranker, channel_log_probs
from transformer.decoding.search import beam_search, greedy_search
from transformer.decoding.translator import translate, translate_ids
from transformer.model import Dropout, Transformer
from transformer.train import main as train_main
from transformer.train import train
from transformer.training.loss import TranslationLoss

CUDA_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NO_CUDA = pytest.mark.skipif(CUDA_GPUS == 0, reason="no CUDA GPU on this machine: not run")
NO_TWO_GPUS = pytest.mark.skipif(CUDA_GPUS < 2, reason=f"needs two CUDA GPUs, this machine has {CUDA_GPUS}: not run")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NO_CUDA)]
# fp16 needs CUDA (GradScaler); bf16 on a CPU without native bf16 is only slow, so it runs on CUDA only.
RUNS = [pytest.param("cpu", "fp32", id="cpu-fp32")] + [
    pytest.param("cuda", precision, id=f"cuda-{precision}", marks=NO_CUDA) for precision in ("fp32", "bf16", "fp16")]

VOCAB = 40
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 on both sides: only summation order may differ


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------
# 1. Forward and backward of the whole model, and the training loss, against the CPU in float64
# ---------------------------------------------------------------------------------------------

def float64_model(norm_first: bool) -> Transformer:
    """Two layers each side, d_model 32, two heads, shared and tied embeddings (as the configs), eval mode."""
    torch.manual_seed(0)
    model = Transformer(VOCAB, VOCAB, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                        dropout=0.1, norm_first=norm_first, share_embeddings=True, tie_output=True, pad_id=PAD_ID)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases and LayerNorm affines, so that their gradients matter
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (4, 9) with 9, 6, 3, 7 real tokens ending in EOS; tgt_in = BOS + y and tgt_out = y + EOS,
    right-padded to 8, with 5, 8, 2, 6 real positions."""
    generator = torch.Generator().manual_seed(1)
    src_lengths, tgt_lengths = [9, 6, 3, 7], [5, 8, 2, 6]
    src = torch.full((4, max(src_lengths)), PAD_ID)
    tgt_in = torch.full((4, max(tgt_lengths)), PAD_ID)
    tgt_out = torch.full((4, max(tgt_lengths)), PAD_ID)
    for i, (n, m) in enumerate(zip(src_lengths, tgt_lengths)):
        src[i, : n - 1] = torch.randint(4, VOCAB, (n - 1,), generator=generator)
        src[i, n - 1] = EOS_ID
        y = torch.randint(4, VOCAB, (m - 1,), generator=generator)
        tgt_in[i, :m] = torch.cat([torch.tensor([BOS_ID]), y])
        tgt_out[i, :m] = torch.cat([y, torch.tensor([EOS_ID])])
    return src, tgt_in, tgt_out


def forward_and_backward(model: Transformer, src, tgt_in, tgt_out, upstream) -> dict[str, torch.Tensor]:
    """model(src, tgt_in), then the gradient of sum(logits * upstream) with respect to the encoder's
    input, the encoder's output (memory), the decoder's input and every parameter; all on the CPU."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args):
            args[0].retain_grad()
            captured[name] = args[0]
        return hook

    def keep_memory(module, args, output):
        output.retain_grad()
        captured["memory"] = output

    handles = [model.encoder.register_forward_pre_hook(keep_input("encoder_input")),
               model.decoder.register_forward_pre_hook(keep_input("decoder_input")),
               model.encoder.register_forward_hook(keep_memory)]
    try:
        model.zero_grad(set_to_none=True)
        logits = model(src, tgt_in)
        (logits * upstream).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    result = {"logits": logits, "memory": captured["memory"]}
    result.update({f"grad {name}": t.grad for name, t in captured.items()})
    result.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return to_cpu(result)


def loss_and_backward(model: Transformer, src, tgt_in, tgt_out) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = TranslationLoss(model, label_smoothing=0.1)(src, tgt_in, tgt_out)
    loss.backward()
    return to_cpu({"loss": loss, **{f"grad {name}": p.grad for name, p in model.named_parameters()}})


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_forward_gradients_and_loss_on_device_equal_the_cpu_in_float64(device, norm_first, monkeypatch):
    reference_model = float64_model(norm_first)
    model = float64_model(norm_first)
    model.load_state_dict(reference_model.state_dict())
    model.to(device)
    src, tgt_in, tgt_out = padded_batch()
    # Random weights on the real target positions only: padded positions then get no gradient.
    upstream = torch.randn(*tgt_in.shape, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    upstream *= tgt_out.ne(PAD_ID).unsqueeze(-1)

    fused_calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        fused_calls.append(args[0].device.type)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    expected = forward_and_backward(reference_model, src, tgt_in, tgt_out, upstream)
    expected_loss = loss_and_backward(reference_model, src, tgt_in, tgt_out)
    assert fused_calls == [], "the CPU reference should write attention out (at most 9 keys)"

    # On the CPU, send the device run's attention to the fused kernel too (CUDA always takes it).
    monkeypatch.setattr(attention_module, "CPU_WRITTEN_OUT_MAX_KEYS", 0)
    on_device = [t.to(device) for t in (src, tgt_in, tgt_out, upstream)]
    actual = forward_and_backward(model, *on_device)
    # 2 encoder self-attentions, 2 decoder self-attentions and 2 cross-attentions, all fused.
    assert fused_calls == [torch.device(device).type] * 6
    actual_loss = loss_and_backward(model, *on_device[:3])
    assert all(p.device.type == torch.device(device).type for p in model.parameters())

    assert actual.keys() == expected.keys() and len(actual) > 20
    for name in expected:
        assert actual[name].dtype == torch.float64, name
        torch.testing.assert_close(actual[name], expected[name], **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    for name in expected_loss:
        torch.testing.assert_close(actual_loss[name], expected_loss[name], **TIGHT,
                                   msg=lambda m, name=name: f"{name}: {m}")

    # Padding neither leaks into nor receives anything, on either device (exact zeros).
    src_pad, tgt_pad = src.eq(PAD_ID), tgt_out.eq(PAD_ID)
    for result in (expected, actual):
        assert torch.all(result["memory"][src_pad] == 0)
        assert torch.all(result["grad memory"][src_pad] == 0)
        assert torch.all(result["grad encoder_input"][src_pad] == 0)
        assert torch.all(result["grad decoder_input"][tgt_pad] == 0)
        assert result["grad memory"][~src_pad].abs().min() > 0
    assert expected_loss["loss"].item() > 0 and math.isfinite(expected_loss["loss"].item())


# ---------------------------------------------------------------------------------------------
# 2. Dropout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_keeps_x_over_1_minus_p_and_its_gradient_is_the_mask(device, dtype):
    # p = 0.25: exactly a multiple of 1/65536, so the CPU mask drops with probability p itself, and
    # 1 / (1 - p) = 4/3 rounds to the same float32 on every device.
    p = 0.25
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 400, generator=generator).to(device, dtype)
    upstream = torch.randn(500, 400, generator=generator).to(device, dtype)
    assert torch.all(x != 0) and torch.all(upstream != 0)
    x.requires_grad_()
    torch.manual_seed(0)
    layer = Dropout(p).train()
    y = layer(x)
    y.backward(upstream)

    assert y.dtype == dtype and y.device == x.device and x.grad.dtype == dtype
    kept = y != 0
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) < 0.005, f"dropped {dropped:.4f} of the elements, expected {p}"
    # Each kept element is x * (1 / (1 - p)) computed in float32 and rounded once to x's dtype.
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32, device=device)
    expected = (x.detach().float() * scale).to(dtype)
    assert torch.equal(y[kept], expected[kept])
    # The gradient is upstream * mask * scale, with the forward's very mask.
    expected_grad = torch.where(kept, (upstream.float() * scale).to(dtype), torch.zeros_like(upstream))
    assert torch.equal(x.grad, expected_grad)

    # Another call draws another mask; eval mode is the identity.
    assert not torch.equal(layer(x.detach()) != 0, kept)
    assert layer.eval()(x) is x


# ---------------------------------------------------------------------------------------------
# 3. Search
# ---------------------------------------------------------------------------------------------

def test_beam_search_with_and_without_cache_agree_and_match_the_cpu(device):
    reference = random_model(3, dtype=torch.float64)  # random weights, peaky next-token distributions
    model = copy.deepcopy(reference).to(device)
    src = random_source(3, [5, 8, 3, 6])

    def beams(m: Transformer, x: torch.Tensor, use_cache: bool) -> list:
        return beam_search(m, x, beam_size=4, length_penalty=0.6, max_len_b=8, n_best=4, use_cache=use_cache)

    cpu = beams(reference, src, True)
    cached = beams(model, src.to(device), True)
    uncached = beams(model, src.to(device), False)

    def tokens(result):
        return [[h.tokens for h in hypotheses] for hypotheses in result]

    assert tokens(cached) == tokens(uncached) == tokens(cpu)
    assert all(len(hypotheses) == 4 for hypotheses in cpu)
    assert len({len(h.tokens) for hypotheses in cpu for h in hypotheses}) > 1  # not all cut at one length
    for a, b, c in zip(cached, uncached, cpu):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-9)
        assert [h.score for h in a] == pytest.approx([h.score for h in c], abs=1e-9)

    greedy = greedy_search(model, src.to(device), max_len_b=8)
    assert greedy == greedy_search(model, src.to(device), max_len_b=8, use_cache=False)
    assert greedy == greedy_search(reference, src, max_len_b=8)


def test_noisy_channel_reranking_on_device_matches_the_cpu(device):
    forward, reverse = random_model(4, dtype=torch.float64), random_model(5, dtype=torch.float64)
    sources = [row[row != PAD_ID].tolist() for row in random_source(6, [3, 5, 8, 4, 7, 6])]
    outputs = [source[:-1][::-1] for source in sources]  # any ids will do for the channel scores
    cpu_scores = channel_log_probs(reverse, sources, outputs, batch_tokens=20)
    on_device = copy.deepcopy(reverse).to(device)
    assert channel_log_probs(on_device, sources, outputs, batch_tokens=20) == pytest.approx(cpu_scores, abs=1e-9)
    reranker = ChannelReranker(on_device, 3.0)
    chosen = translate_ids(copy.deepcopy(forward).to(device), sources, 4, 1.0, max_len_b=6, reranker=reranker)
    assert chosen == translate_ids(forward, sources, 4, 1.0, max_len_b=6, reranker=ChannelReranker(reverse, 3.0))
    assert chosen != translate_ids(forward, sources, 4, 1.0, max_len_b=6)  # the reverse model changed choices


# ---------------------------------------------------------------------------------------------
# 4. Training through the command-line entry point
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, precision", RUNS)
def test_a_training_run_on_device_learns_saves_and_loads_back(device, precision, corpus, tmp_path, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="transformer.train")
    with process_state_kept():
        train_main(["--config", str(CONFIG), *overrides(corpus, run_dir, train_device=device,
                                                         train_precision=precision)])

    resolved = "cuda:0" if device == "cuda" else "cpu"
    assert any(f"device {resolved}, 1 threads, {precision}" in r.getMessage() for r in caplog.records)
    saved_config = load_config(run_dir / "config.yaml").train
    assert (saved_config.device, saved_config.precision) == (device, precision)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    validation = [r for r in rows if "valid_loss" in r]
    assert len(losses) == MAX_STEPS // 5 and validation
    assert all(math.isfinite(v) for v in losses + [r["valid_loss"] for r in validation])
    assert losses[-1] < losses[0], f"{precision} on {device} did not learn: {losses}"
    assert all(0 <= r["valid_bleu"] <= 100 for r in validation)

    checkpoints = run_checkpoints(run_dir)
    assert checkpoints and checkpoints[-1].name == f"step_{MAX_STEPS:08d}.pt"
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "final.pt").is_file()
    state = load_checkpoint(checkpoints[-1])
    assert state["step"] == MAX_STEPS
    assert state["config"]["train"]["device"] == device and state["config"]["train"]["precision"] == precision
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in state["model"].values()
               if t.is_floating_point())
    assert (state["scaler"] is not None) == (precision == "fp16")  # GradScaler only for fp16
    # A CUDA run keeps the GPU's generator (its dropout masks resume exactly too); a CPU run never touches CUDA.
    assert ("cuda" in state["rng"][0]) == (device == "cuda")

    loaded = load_model([run_dir / "checkpoints" / "final.pt"], device)
    assert loaded.config.train.device == device and loaded.config.train.precision == precision
    assert not loaded.model.training
    assert all(p.device.type == device and p.dtype == torch.float32 for p in loaded.model.parameters())
    sentences = (corpus / "test.de").read_text(encoding="utf-8").splitlines()[:6] + [""]
    outputs = translate(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, sentences, beam_size=2,
                        max_len_b=5, device=device)
    assert len(outputs) == len(sentences) and all(isinstance(o, str) for o in outputs) and outputs[-1] == ""


# ---------------------------------------------------------------------------------------------
# 5. Synchronisations of a CUDA training step, and two processes over NCCL
# ---------------------------------------------------------------------------------------------

def synchronisations(corpus, run_dir, steps: int, precision: str) -> list[str]:
    """Where the synchronising CUDA calls of a `steps`-step run were made (`torch.cuda.set_sync_debug_mode`)."""
    cfg = load_config(CONFIG, overrides(corpus, run_dir / str(steps), train_device="cuda", train_precision=precision,
                                        train_max_steps=steps, train_eval_every=1000, train_save_every=1000,
                                        train_eval_bleu_sentences=0, train_average_last=1, train_log_every=1))
    with warnings.catch_warnings(record=True) as caught, process_state_kept():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]


@NO_CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_cuda_training_step_synchronises_once(precision, corpus, tmp_path):
    """Runs of 2 and 5 steps: start-up, the final validation and the checkpoints are the same in both,
    so the difference is three steps' synchronisations. One per step is left: the read of the
    step's loss and gradient norm that decides the update."""
    short, long = (synchronisations(corpus, tmp_path, steps, precision) for steps in (2, 5))
    per_step = (len(long) - len(short)) / 3
    extra = sorted(set(long) - set(short)) or sorted(set(long))
    assert per_step == 1, f"{per_step} synchronisations per step; made at {extra[:10]}"


@NO_TWO_GPUS
def test_two_processes_train_data_parallel_over_nccl(corpus, tmp_path):
    """Two ranks on cuda:0 and cuda:1 (NCCL for the gradients and the step's sum, gloo for host
    numbers), counted inside each rank (tests/multinode_worker.py): each plain step reads the device
    once and runs one collective of each kind."""
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    precision = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp32"
    done = run_module("torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", str(ROOT / "tests" / "multinode_worker.py"), "--config",
                      str(CONFIG), *overrides(corpus, tmp_path / "run", train_device="cuda", train_precision=precision,
                                              train_max_steps=6, train_save_every=3, train_eval_every=1000,
                                              train_eval_bleu_sentences=0, train_average_last=1),
                      env={**os.environ, "RECORD_DIR": str(record_dir)})
    assert done.returncode == 0, done.stderr[-5000:]
    assert "device cuda:0" in done.stderr and "device cuda:1" in done.stderr
    for rank in (0, 1):
        steps = {s["step"]: s for s in json.loads((record_dir / f"rank{rank}.json").read_text())["steps"]}
        for n in (2, 4, 5):  # not step 1 (DDP sets up its buckets) nor the saving steps
            assert steps[n]["reads"] == {"tolist": 1} and steps[n]["built_at_read"] == n + 1, steps[n]
            assert steps[n]["collectives"] == {"all_reduce": 1, "all_gather": 1}, steps[n]
    state = load_checkpoint(run_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6 and len(state["rng"]) == 2 and all("cuda" in r for r in state["rng"])
