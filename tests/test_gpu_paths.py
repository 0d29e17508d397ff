"""The logic of the GPU code paths, tested on the CPU: what a GPU run decides and how often it waits.

No GPU runs here. Each test drives the decision a CUDA run takes with the device's answers patched
in (compute capability, device count, a loss scaler), or counts, with a dispatch-mode counter,
the operations that would make the host wait for a GPU:

* fp16's loss scaler: a skipped step is followed by a working one, a run of them stops with a
  one-line error, and ranks agree on skipping before they branch;
* `auto` precision from the compute capability of the GPU asked for; device choice under torchrun;
* CPU-only process settings, TF32 and the RNG gathering gated on the run's device;
* host reads per training step and per search step, down to the ones left on purpose;
* the batch's token positions, the loss's device path, and validation sharded over ranks.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
from helpers import CONFIG, ROOT, free_port, one_line_error, overrides, random_model, random_source, run_module
from host_reads import HostReads, uncounted

from transformer import runtime
from transformer import train as train_module
from transformer.checkpoint import CheckpointError, load_checkpoint, run_checkpoints
from transformer.config import ConfigError, DecodeConfig, load_config
from transformer.data.batches import Batch, ParallelData, collate
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.decoding.search import Hypothesis, beam_search, greedy_search
from transformer.precision import ProbeShape, choose_precision
from transformer.train import Ranks, main, optimizer_step, train
from transformer.training import distributed
from transformer.training import loss as loss_module
from transformer.training import step as step_module
from transformer.training.loss import TranslationLoss, label_smoothed_cross_entropy

# ---------------------------------------------------------------------------------------------
# Counting host reads
# ---------------------------------------------------------------------------------------------

def host_reads_per_training_step(cfg_overrides: list[str], steps: tuple[int, int] = (2, 5)) -> Counter[str]:
    """Host reads per optimizer step of `train`, as a GPU run would take them.

    Two runs of different lengths are counted and differenced, so that start-up, the final
    validation and the checkpoints cancel out; building batches (host work on host tensors) is not
    counted. The loss takes its device path (`rows_found_on_host` is what a GPU answers).
    """
    prefetch = step_module.BatchStream.prefetch

    def prefetch_uncounted(self):
        with uncounted():
            return prefetch(self)

    totals = []
    for n in steps:
        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(step_module.BatchStream, "prefetch", prefetch_uncounted)
            if hasattr(loss_module, "rows_found_on_host"):
                mp.setattr(loss_module, "rows_found_on_host", lambda device: False)
            cfg = load_config(CONFIG, [*cfg_overrides, f"train.max_steps={n}",
                                       f"train.output_dir={cfg_overrides_dir(cfg_overrides)}/{n}"])
            with HostReads() as reads:
                train(cfg)
            totals.append(reads.counts)
        finally:
            mp.undo()
    span = steps[1] - steps[0]
    per_step = Counter()
    for kind in set(totals[0]) | set(totals[1]):
        difference = totals[1][kind] - totals[0][kind]
        assert difference % span == 0, f"{kind}: {difference} reads over {span} steps is not the same every step"
        if difference:
            per_step[kind] = difference // span
    return per_step


def cfg_overrides_dir(cfg_overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in cfg_overrides if o.startswith("train.output_dir="))


def test_a_training_step_reads_the_device_once(corpus, tmp_path):
    """The one read left: the step's summed loss and gradient norm, read together to decide the
    update (fp32/bf16 skip a non-finite step on the host). Everything else a step needs (token
    positions, token counts) comes from the host's batches; logging reads nothing more."""
    for accumulate in (1, 2):
        changes = overrides(corpus, tmp_path / f"acc{accumulate}", train_accumulate=accumulate,
                            train_eval_every=1000, train_save_every=1000, train_eval_bleu_sentences=0,
                            train_average_last=1, train_log_every=1, train_cooldown=0.2)
        assert host_reads_per_training_step(changes) == Counter(tolist=1), accumulate


def test_the_next_steps_batches_are_built_and_sent_before_a_step_waits(corpus, tmp_path, monkeypatch):
    """While the device runs step n, the host builds step n+1's batches and starts their copies, so
    that after the step's one read the next step's kernels are launched at once. Each step's
    token counts are agreed on by the ranks in one collective of host numbers after the step
    before (here one process, where that collective is the identity)."""
    events = []
    collate, to, read = step_module.collate, Batch.to, Ranks.sum_on_device
    monkeypatch.setattr(step_module, "collate", lambda *a, **k: events.append("build") or collate(*a, **k))
    monkeypatch.setattr(Batch, "to", lambda self, device: events.append("send") or to(self, device))
    monkeypatch.setattr(Ranks, "sum_on_device", lambda self, values: events.append("read") or read(self, values))
    agreed = []
    agree = Ranks.agree
    monkeypatch.setattr(Ranks, "agree", lambda self, sums, maxima: agreed.append(list(sums)) or agree(self, sums, maxima))
    for accumulate in (1, 2):
        events.clear()
        agreed.clear()
        train(load_config(CONFIG, overrides(corpus, tmp_path / f"acc{accumulate}", train_max_steps=4,
                                            train_accumulate=accumulate, train_eval_every=1000, train_save_every=1000,
                                            train_eval_bleu_sentences=0, train_average_last=1)))
        steps = "".join("r" if e == "read" else "b" for e in events if e != "send").split("r")[:4]
        # Before step 1's read: its batches and step 2's; before each later read: the next step's.
        assert steps == ["b" * 2 * accumulate] + ["b" * accumulate] * 3, (accumulate, events)
        assert all(events[i + 1] == "send" for i, e in enumerate(events) if e == "build")
        # One agreement before step 1 and one after each step, each on the next step's token counts.
        assert len(agreed) == 5 and all(tgt > 0 and total > tgt for tgt, total in agreed)


# ---------------------------------------------------------------------------------------------
# fp16's loss scaler and non-finite steps
# ---------------------------------------------------------------------------------------------

def cpu_scaler(monkeypatch, init_scale: float = 2.0**10) -> list[torch.amp.GradScaler]:
    """Make fp32 CPU runs train through a real GradScaler (the fp16 code path); returns the scalers made."""
    made = []

    def make(precision, device):
        made.append(torch.amp.GradScaler("cpu", init_scale=init_scale))
        return made[-1]

    monkeypatch.setattr(train_module, "grad_scaler", make)
    return made


def nan_losses(monkeypatch, bad_steps) -> list[int]:
    """Training losses (not validation ones) become NaN at the 1-based calls in `bad_steps`."""
    forward = TranslationLoss.forward
    calls = []

    def patched(self, *batch):
        loss = forward(self, *batch)
        if not self.training:
            return loss
        calls.append(1)
        return loss * float("nan") if bad_steps(len(calls)) else loss

    monkeypatch.setattr(TranslationLoss, "forward", patched)
    return calls


def test_with_a_scaler_the_step_after_a_skipped_one_works(corpus, tmp_path, monkeypatch, caplog):
    scalers = cpu_scaler(monkeypatch)
    nan_losses(monkeypatch, lambda call: call % 2 == 1)  # steps 1, 3, 5
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=6, train_max_nonfinite=2,
                                        train_eval_every=1000, train_save_every=1000, train_eval_bleu_sentences=0,
                                        train_average_last=1))
    train(cfg)  # before: step 2's unscale_() raised "unscale_() has already been called ..."
    assert len([r for r in caplog.records if "update skipped" in r.getMessage()]) == 3
    state = load_checkpoint(run_checkpoints(tmp_path)[-1])
    assert state["optimizer"]["state"][0]["step"].item() == 3  # steps 2, 4, 6 updated
    # Every skipped step's NaN gradients were seen by update(), which halved the scale each time.
    assert state["scaler"]["scale"] == 2.0**10 / 8 and scalers[0].get_scale() == 2.0**10 / 8


def test_with_a_scaler_a_run_of_non_finite_steps_stops_with_one_line(corpus, tmp_path, monkeypatch):
    cpu_scaler(monkeypatch)
    calls = nan_losses(monkeypatch, lambda call: call > 2)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_max_nonfinite=3, train_eval_every=1000,
                                                 train_save_every=1000)])
    one_line_error(exit, "3 non-finite steps in a row at step 5")
    assert len(calls) == 5


def tiny_regression() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)


def fp16_loss(model: torch.nn.Linear) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        return model(torch.randn(16, 8)).float().pow(2).sum()


def test_fp16_on_the_cpu_overflow_skips_lowers_the_scale_and_the_next_step_updates():
    model, optimizer = tiny_regression()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    ranks = Ranks()
    for overflow in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        loss = fp16_loss(model)
        scaler.scale(loss).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")  # as an fp16 overflow in the backward pass
        finite, total = optimizer_step(model, optimizer, scaler, 1.0, loss.detach().double(), ranks)
        optimizer.zero_grad(set_to_none=True)
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        # An overflow is the scaler's business: the loss is finite, the scaler skips the update.
        assert finite and total == loss.item()
        assert moved is not overflow
    assert scaler.get_scale() == 2.0**7


class OtherRankSends(Ranks):
    """A rank of two whose partner's step scalars are `other`: the sum a real all-reduce returns."""

    def __init__(self, other: list[float]) -> None:
        super().__init__(rank=0, world_size=2)
        self.other = other

    def sum_on_device(self, values: torch.Tensor) -> list[float]:
        return (values + torch.tensor(self.other, dtype=values.dtype)).tolist()


@pytest.mark.parametrize("scaled", [False, True])
def test_a_non_finite_loss_on_another_rank_skips_the_update_here_too(scaled):
    model, optimizer = tiny_regression()
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    before = [p.detach().clone() for p in model.parameters()]
    loss = fp16_loss(model) if scaled else model(torch.randn(16, 8)).pow(2).sum()
    (loss if scaler is None else scaler.scale(loss)).backward()
    finite, _ = optimizer_step(model, optimizer, scaler, 0.0, loss.detach().double(), OtherRankSends([math.nan, 1.0]))
    assert not finite
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if scaler is not None:  # update() ran: the next unscale_() is allowed
        scaler.unscale_(optimizer)


# ---------------------------------------------------------------------------------------------
# Devices: precision, device choice, process settings
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with cuda:0 of compute capability 7.0 (V100) and cuda:1 of 8.0 (A100)."""
    capabilities = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts, in 2.13


def test_auto_precision_follows_the_capability_of_the_gpu_asked_for(two_gpus):
    def never(*args):
        raise AssertionError("a GPU's precision is decided by its compute capability, not by the CPU probe")

    shape = ProbeShape.of(64, 128, 100, 100, training=True)
    choose = lambda setting, device: choose_precision(setting, torch.device(device), shape, never).precision  # noqa: E731
    assert choose("auto", "cuda:0") == "fp32"
    assert choose("auto", "cuda:1") == "bf16"
    assert [runtime.has_native_bf16(torch.device(f"cuda:{i}")) for i in (0, 1)] == [False, True]
    assert choose("fp16", "cuda:0") == "fp16"


def test_device_choice_under_torchrun(two_gpus):
    assert runtime.resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda:1")
    assert runtime.resolve_device("auto", local_rank=0, world_size=2) == torch.device("cuda:0")
    assert runtime.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="all 2 ranks on one GPU"):
        runtime.resolve_device("cuda:0", local_rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"asks for GPU 2, but this machine has 2 \(cuda:0 .. cuda:1\)"):
        runtime.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="LOCAL_RANK 3"):
        runtime.resolve_device("cuda", local_rank=3, world_size=4)


def test_a_process_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch):
    """SLURM's `srun --gpus-per-task=1` shows each task only its own GPU, as cuda:0, while the ranks
    of a node count LOCAL_RANK 0, 1, 2, ...; more ranks than GPUs under torchrun is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for setting in ("auto", "cuda"):
        assert distributed.run_device(load_config(CONFIG, [f"train.device={setting}"]).train) == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun started four ranks on this machine
    with pytest.raises(ConfigError, match="4 ranks on this machine .LOCAL_WORLD_SIZE. but 1 GPU"):
        distributed.run_device(load_config(CONFIG, ["train.device=cuda"]).train)


@pytest.mark.parametrize("size", ["base", "big"])
def test_the_wmt14_configs_train_in_bf16_on_an_a100_and_in_fp32_on_a_v100(two_gpus, size):
    cfg = load_config(ROOT / "configs" / f"wmt14_en_de_{size}.yaml")
    shape = ProbeShape.of(cfg.model.d_model, cfg.model.d_ff, cfg.tokenizer.vocab_size, cfg.train.max_tokens, True)
    chosen = [choose_precision(cfg.train.precision, torch.device(f"cuda:{i}"), shape).precision for i in (0, 1)]
    assert chosen == ["fp32", "bf16"]  # cuda:0 is a V100 (7.0), cuda:1 an A100 (8.0)


class OldDistributedDataParallel:
    """The constructor of PyTorch before 2.13's DDP: `broadcast_buffers`, no `forward_sync_buffers`."""

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True):
        self.module, self.device_ids, self.broadcast_buffers = module, device_ids, broadcast_buffers


class NewDistributedDataParallel:
    """DDP's constructor from PyTorch 2.13: `forward_sync_buffers` beside the deprecated `broadcast_buffers`."""

    def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=True):
        self.module, self.device_ids = module, device_ids
        self.broadcast_buffers, self.forward_sync_buffers = broadcast_buffers, forward_sync_buffers


def test_ddp_is_built_without_buffer_broadcasts_in_every_supported_pytorch(monkeypatch):
    module = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", OldDistributedDataParallel)
    old = distributed.data_parallel(module, torch.device("cuda:3"))
    assert (old.broadcast_buffers, old.device_ids) == (False, [3])
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", NewDistributedDataParallel)
    new = distributed.data_parallel(module, torch.device("cpu"))
    assert (new.forward_sync_buffers, new.broadcast_buffers, new.device_ids) == (False, None, None)


def test_one_gpu_named_for_several_ranks_is_a_one_line_error(two_gpus, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_device="cuda:0")])
    one_line_error(exit, "train.device", "'cuda:0' would put all 2 ranks on one GPU")


def test_cpu_process_settings_apply_to_cpu_runs_only(monkeypatch, corpus, tmp_path):
    applied = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: applied.append("malloc"))
    monkeypatch.setattr(runtime, "bound_onednn_caches", lambda: applied.append("onednn"))
    assert not runtime.tune_process_for(torch.device("cuda:0")) and applied == []
    assert runtime.tune_process_for(torch.device("cpu")) and applied == ["malloc", "onednn"]
    applied.clear()
    main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_max_steps=1, train_eval_bleu_sentences=0,
                                             train_average_last=1)])
    assert applied == ["malloc", "onednn"]


def test_tf32_is_set_for_cuda_runs_only():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not runtime.use_tf32(torch.device("cpu"), True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert runtime.use_tf32(torch.device("cuda:0"), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not runtime.use_tf32(torch.device("cuda:0"), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_a_cpu_run_gathers_no_cuda_state_on_a_gpu_machine(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    states = distributed.rng_states(torch.device("cpu"))
    assert list(states[0]) == ["torch"]
    distributed.restore_rng([{**states[0], "cuda": torch.zeros(8, dtype=torch.uint8)}], 0, 1, 1, torch.device("cpu"))


def test_a_process_with_a_process_group_prepares_data_in_fresh_processes(corpus, tmp_path, monkeypatch, caplog):
    """A training process has initialised CUDA and NCCL (here: a gloo group) by the time it prepares
    data; its children must not be forked from it. The spawned child prepares the same folder as a
    forked one, and its log lines reach this process's log."""
    import torch.distributed as dist

    from transformer.data import prepare as prepare_module
    cfg = load_config(CONFIG, overrides(corpus, tmp_path / "run", tokenizer_cache_dir=tmp_path / "tokenizers")
                      + ["data.prepare_workers=1", f"data.prepared_dir={tmp_path / 'forked'}"])
    prepare_module.prepare_in_child(cfg)
    contexts = []
    get_context = prepare_module.multiprocessing.get_context
    monkeypatch.setattr(prepare_module.multiprocessing, "get_context",
                        lambda method: contexts.append(method) or get_context(method))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        caplog.set_level("INFO")
        spawned = load_config(CONFIG, overrides(corpus, tmp_path / "run", tokenizer_cache_dir=tmp_path / "tokenizers")
                              + ["data.prepare_workers=1", f"data.prepared_dir={tmp_path / 'spawned'}"])
        prepare_module.prepare_in_child(spawned)
    finally:
        dist.destroy_process_group()
    assert contexts == ["spawn"]  # the child's own children are forked from it: it has no threads to fear
    assert any(r.getMessage().startswith(f"prepared {tmp_path / 'spawned'}") for r in caplog.records)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("forked", "spawned")]
    assert manifests[0]["files"] == manifests[1]["files"]
    assert prepare_module.child_start_method() == "fork"  # without the group, as everywhere in the test process


# ---------------------------------------------------------------------------------------------
# Decoding on a GPU machine: int8, TF32, CTranslate2
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tf32_kept():
    """TF32's process-wide switches as they were before the test."""
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def decoding_device(*argv: str) -> torch.device:
    from transformer.commands import evaluate, options
    parser = evaluate._parser()
    return options.prepare(parser, parser.parse_args(["--checkpoint", "model.pt", *argv]))


def test_int8_with_device_auto_decodes_on_the_cpu_of_a_gpu_machine(two_gpus, tf32_kept, caplog):
    caplog.set_level("INFO")
    assert decoding_device("--precision", "int8") == torch.device("cpu")
    assert any("int8 runs on the CPU" in r.getMessage() for r in caplog.records)
    assert decoding_device("--precision", "bf16") == torch.device("cuda:0")
    # CTranslate2 has its own int8 kernels on GPUs.
    assert decoding_device("--precision", "int8", "--engine", "ctranslate2") == torch.device("cuda:0")


def test_int8_named_for_a_gpu_says_what_to_do(two_gpus):
    from transformer.commands import options
    with pytest.raises(CheckpointError, match="int8 runs on the CPU only, not on cuda:1: decode with --device cpu"):
        options._in_precision(torch.nn.Linear(2, 2), "int8", torch.device("cuda:1"))


def test_float32_decoding_on_a_gpu_uses_tf32_as_training_does(two_gpus, tf32_kept):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    decoding_device("--device", "cpu")
    assert not torch.backends.cuda.matmul.allow_tf32
    decoding_device("--device", "cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_ctranslate2_decodes_on_the_device_asked_for(tiny_ctranslate2, monkeypatch):
    from transformer.commands import evaluate, options
    from transformer.decoding import ctranslate2_engine
    made = []
    translator = ctranslate2_engine.ctranslate2.Translator

    def recorded(folder, **kwargs):
        made.append({key: kwargs[key] for key in ("device", "device_index")})
        return translator(folder, **{**kwargs, "device": "cpu", "device_index": 0})  # this machine has no GPU

    monkeypatch.setattr(ctranslate2_engine.ctranslate2, "Translator", recorded)
    args = evaluate._parser().parse_args(["--checkpoint", str(tiny_ctranslate2), "--engine", "ctranslate2"])
    for device in ("cuda:1", "cpu"):
        engine, _, _ = options.load_engine(args, torch.device(device))
        assert engine.translate(["ein hund"], DecodeConfig(engine="ctranslate2", beam_size=2, max_len_b=3,
                                                           length_penalty_form="length"))
    assert made == [{"device": "cuda", "device_index": 1}, {"device": "cpu", "device_index": 0}]


# ---------------------------------------------------------------------------------------------
# Searches: one host read per step
# ---------------------------------------------------------------------------------------------

def reads_per_search_step(monkeypatch, search, **kwargs) -> list[int]:
    """Host reads in each step of `search` on a model that never chooses EOS before it is forced,
    so that every step but the last (which forces EOS) is a plain one."""
    model = random_model(3)
    project = model.project
    eos_penalty = torch.zeros(model.output_projection.out_features, dtype=torch.float64)
    eos_penalty[EOS_ID] = -1e4
    monkeypatch.setattr(model, "project", lambda hidden: project(hidden) + eos_penalty)
    src = random_source(4, [5, 3, 7, 2])
    marks = []
    import transformer.decoding.search as search_module
    best = search_module._best_next_tokens

    def marked(*args, **kw):
        marks.append(reads.total)
        return best(*args, **kw)

    monkeypatch.setattr(search_module, "_best_next_tokens", marked)
    with HostReads() as reads:
        outputs = search(model, src, max_len_a=0.0, max_len_b=6, **kwargs)
    marks.append(reads.total)
    assert len(marks) == 8  # steps 0 .. 6, the last forcing EOS
    lengths = [len(o[0].tokens if isinstance(o[0], Hypothesis) else o) for o in outputs]
    assert lengths == [6] * 4
    return [b - a for a, b in zip(marks, marks[1:])]


def test_greedy_search_reads_the_device_once_per_step(monkeypatch):
    per_step = reads_per_search_step(monkeypatch, greedy_search)
    assert per_step[:-1] == [1] * 6  # finished.any(): which rows to drop is a host decision


def test_beam_search_reads_the_device_once_per_step(monkeypatch):
    per_step = reads_per_search_step(monkeypatch, beam_search, beam_size=3)
    assert per_step[:-1] == [1] * 6  # one read of (anything finished, any sentence done)


# ---------------------------------------------------------------------------------------------
# Batches, the loss's device path, sharded validation
# ---------------------------------------------------------------------------------------------

def test_the_batch_carries_its_token_positions_from_the_host():
    data = ParallelData(src=[[5, 6, 3], [7, 3], [8, 9, 10, 3]], tgt=[[4], [5, 6, 7], [8, 9]], indices=[0, 1, 2])
    batch = collate([0, 1, 2], data)
    assert torch.equal(batch.src_index, batch.src.ne(PAD_ID).flatten().nonzero().squeeze(1))
    assert torch.equal(batch.tgt_index, batch.tgt_out.ne(PAD_ID).flatten().nonzero().squeeze(1))
    assert batch.tgt_index.numel() == batch.n_tgt_tokens and batch.src_index.numel() == batch.n_src_tokens
    assert collate([0], data).src_index is None  # no padding: the encoder runs unpacked, as before
    moved = batch.to("cpu")
    assert torch.equal(moved.src_index, batch.src_index) and torch.equal(moved.tgt_index, batch.tgt_index)


def test_the_loss_with_host_positions_equals_the_loss_finding_them():
    model = random_model(5, dtype=torch.float32).train()
    data = ParallelData(src=[[5, 6, 3], [7, 3], [8, 9, 10, 3]], tgt=[[4], [5, 6, 7], [8, 9]], indices=[0, 1, 2])
    batch = collate([0, 1, 2], data)
    loss_fn = TranslationLoss(model.eval(), 0.1)
    given = loss_fn(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
    found = loss_fn(batch.src, batch.tgt_in, batch.tgt_out)
    assert torch.equal(given, found)


@pytest.mark.parametrize("sources", [[[5, 6, 3], [7, 3], [8, 9, 10, 3]], [[5, 6, 3], [7, 8, 3], [9, 10, 3]]],
                         ids=["source padding", "no source padding"])
def test_a_batch_with_its_positions_trains_without_a_host_read(monkeypatch, sources):
    """Forward and backward of the loss on a batch from `collate`, loss on its device path: no
    read at all, whether or not the sources are padded (a third of Multi30k's batches are not)."""
    monkeypatch.setattr(loss_module, "rows_found_on_host", lambda device: False)
    model = random_model(5, dtype=torch.float32).train()
    data = ParallelData(src=sources, tgt=[[4], [5, 6, 7], [8, 9]], indices=[0, 1, 2])
    batch = collate([0, 1, 2], data)
    loss_fn = TranslationLoss(model, 0.1)
    torch.manual_seed(1)
    with HostReads() as reads:
        given = loss_fn(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
        given.backward()
    assert reads.counts == Counter()
    torch.manual_seed(1)
    found = loss_fn(batch.src, batch.tgt_in, batch.tgt_out)
    assert torch.equal(given, found)


def test_the_device_path_of_the_loss_fixes_underflowed_rows_like_the_host_path(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    target = torch.randint(0, 50, (6,))
    logits[1, target[1]] -= 200.0  # p_y underflows to 0 in float32
    logits[4, target[4]] -= 95.0  # p_y subnormal
    on_host = label_smoothed_cross_entropy(logits, target, 0.1)
    monkeypatch.setattr(loss_module, "rows_found_on_host", lambda device: False)
    on_device = label_smoothed_cross_entropy(logits, target, 0.1)
    exact = torch.nn.functional.cross_entropy(logits.double(), target, label_smoothing=0.1, reduction="sum")
    assert math.isfinite(on_device.item())
    torch.testing.assert_close(on_device.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(on_device, on_host, rtol=1e-6, atol=0)


class RecordingRanks(Ranks):
    """Rank 1 of 2, recording what it would contribute to the collectives."""

    def __init__(self) -> None:
        super().__init__(rank=1, world_size=2)
        self.sums, self.objects = None, None

    def sum_on_device(self, values):
        self.sums = values.clone()
        return values.tolist()

    def gather_objects(self, obj):
        self.objects = obj
        return [obj, obj]


class Rank0With(Ranks):
    """Rank 0 of 2 whose partner contributed what `RecordingRanks` recorded."""

    def __init__(self, partner: RecordingRanks) -> None:
        super().__init__(rank=0, world_size=2)
        self.partner = partner

    def sum_on_device(self, values):
        return (values + self.partner.sums).tolist()

    def gather_objects(self, obj):
        return [obj, self.partner.objects]


def test_validation_sharded_over_two_ranks_gives_the_single_process_result(corpus, tmp_path):
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_tokens=120, train_eval_bleu_sentences=20))
    src_tok, tgt_tok, _, valid_text, valid = train_module.prepare_data(cfg, tmp_path, None)
    torch.manual_seed(0)
    from transformer.model import Transformer
    model = Transformer.from_config(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID)
    loss_fn = TranslationLoss(model, cfg.train.label_smoothing)
    args = (cfg, model, loss_fn, valid, valid_text, src_tok, tgt_tok, torch.device("cpu"))
    single = train_module.validate(*args)
    rank1 = RecordingRanks()
    train_module.validate(*args, rank1)
    sharded = train_module.validate(*args, Rank0With(rank1))
    assert sharded["valid_bleu"] == single["valid_bleu"]
    assert sharded["valid_loss"] == pytest.approx(single["valid_loss"], rel=1e-6)


def test_a_non_finite_step_on_one_rank_is_skipped_by_both_ranks_of_a_real_torchrun(corpus, tmp_path):
    """Two gloo ranks with a real GradScaler: rank 1 alone has a NaN loss at step 2 and an
    infinite gradient (finite loss) at step 4. Both ranks must take the same branches through the
    same collectives (no hang, no error), skip both updates, lower the scale twice and end with
    identical parameters."""
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    changes = {"train_max_steps": 5, "train_eval_every": 1000, "train_save_every": 1000,
               "train_eval_bleu_sentences": 20, "train_max_tokens": 120, "train_keep_last": 1,
               "train_average_last": 1}
    done = run_module("torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", str(ROOT / "tests" / "ddp_fault_worker.py"),
                      "--config", str(CONFIG), *overrides(corpus, tmp_path / "run", **changes),
                      env={**os.environ, "FAULT_RECORD_DIR": str(record_dir)})
    assert done.returncode == 0, done.stderr[-5000:]
    assert "broadcast_buffers" not in done.stderr  # DDP is built without its deprecated argument
    ranks = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # same decisions, same scale, same parameters after every step
    assert [s["finite"] for s in ranks[0]] == [True, False, True, True, True]  # step 4 is the scaler's skip
    assert [s["scale"] for s in ranks[0]] == [2.0**10, 2.0**9, 2.0**9, 2.0**8, 2.0**8]
    checksums = [s["checksum"] for s in ranks[0]]
    assert all(math.isfinite(c) for c in checksums)
    assert checksums[1] == checksums[0] and checksums[3] == checksums[2]  # skipped: nothing moved
    assert len(set(checksums[::2])) == 3  # steps 1, 3 and 5 updated
    state = load_checkpoint(run_checkpoints(tmp_path / "run")[-1])
    assert state["optimizer"]["state"][0]["step"].item() == 3

    # The final validation, sharded over the two ranks through real collectives, equals one
    # process validating the same weights (the step-5 checkpoint) alone.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sharded = next(r for r in rows if r["step"] == 5 and "valid_loss" in r)
    cfg = load_config(CONFIG, overrides(corpus, tmp_path / "single", **changes))
    src_tok, tgt_tok, _, valid_text, valid = train_module.prepare_data(cfg, tmp_path / "single", None)
    from transformer.model import Transformer
    model = Transformer.from_config(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID)
    model.load_state_dict(state["model"])
    single = train_module.validate(cfg, model, TranslationLoss(model, cfg.train.label_smoothing), valid, valid_text,
                                   src_tok, tgt_tok, torch.device("cpu"))
    assert sharded["valid_bleu"] == single["valid_bleu"]
    assert sharded["valid_loss"] == pytest.approx(single["valid_loss"], rel=1e-9)
