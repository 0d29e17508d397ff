"""`precision: auto` decides by measuring float32 against bfloat16 on the run's shapes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import CONFIG

from transformer import precision
from transformer.config import load_config
from transformer.precision import BF16_MIN_SPEEDUP, ProbeShape, bf16_speedup, choose_precision
from transformer.training.step import run_precision

CPU = torch.device("cpu")
SHAPE = ProbeShape.of(256, 1024, 8000, 2000, training=True)


class FakeProbe:
    """A measurement that returns fixed seconds per precision and counts its calls."""

    def __init__(self, fp32: float = 1.0, bf16: float = 0.5, glance_bf16: float | None = None) -> None:
        self.seconds = {"fp32": fp32, "bf16": bf16}
        self.glance_bf16 = glance_bf16
        self.calls: list[tuple[int, str]] = []

    def __call__(self, shape: ProbeShape, name: str, repeats: int) -> float:
        self.calls.append((shape.rows, name))
        if name == "bf16" and shape.rows <= precision.GLANCE_ROWS and self.glance_bf16 is not None:
            return self.glance_bf16
        return self.seconds[name]


@pytest.fixture
def cache_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(precision.CACHE_ENV, str(path))
    return path


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, "bf16"), (2.0, "fp32"), (1.0 / (BF16_MIN_SPEEDUP - 0.05), "fp32"),
                                                    (1.0 / (BF16_MIN_SPEEDUP + 0.05), "bf16")])
def test_auto_picks_bf16_only_where_it_measures_clearly_faster(bf16_seconds, expected):
    probe = FakeProbe(fp32=1.0, bf16=bf16_seconds)
    choice = choose_precision("auto", CPU, SHAPE, probe)
    assert choice.precision == expected
    assert choice.speedup == pytest.approx(1.0 / bf16_seconds) and not choice.cached
    assert f"{choice.speedup:.2f}x float32" in choice.describe()


def test_a_clearly_slower_bf16_is_seen_at_a_glance_without_the_full_probe():
    probe = FakeProbe(fp32=1.0, bf16=0.5, glance_bf16=5.0)  # emulated bf16: 0.2x on the glance
    choice = choose_precision("auto", CPU, SHAPE, probe)
    assert choice.precision == "fp32" and choice.speedup == pytest.approx(0.2)
    assert probe.calls == [(precision.GLANCE_ROWS, "fp32"), (precision.GLANCE_ROWS, "bf16")]


def test_fixed_settings_are_kept_and_a_slow_bf16_request_warns_with_the_figure(caplog):
    def never(*args):
        raise AssertionError("fp32 is not measured")

    assert choose_precision("fp32", CPU, SHAPE, never).precision == "fp32"
    assert choose_precision("int8", CPU, SHAPE, never).precision == "int8"
    with caplog.at_level(logging.WARNING):
        choice = choose_precision("bf16", CPU, SHAPE, FakeProbe(fp32=1.0, bf16=1.6))
    assert choice.precision == "bf16"
    assert "measured 0.62x float32's speed" in caplog.text and "float32 would be faster" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        choose_precision("bf16", CPU, SHAPE, FakeProbe(fp32=1.0, bf16=0.4))
    assert caplog.text == ""


def test_the_answer_is_cached_per_cpu_torch_version_threads_and_shape(cache_file, monkeypatch):
    probe = FakeProbe(fp32=1.0, bf16=0.25)
    first = choose_precision("auto", CPU, SHAPE, probe)
    assert not first.cached and first.seconds >= 0 and len(probe.calls) > 0
    assert list(json.loads(cache_file.read_text()).values()) == [pytest.approx(4.0)]
    probe.calls.clear()
    again = choose_precision("auto", CPU, SHAPE, probe)
    assert again.cached and again.speedup == pytest.approx(4.0) and again.seconds == 0.0 and probe.calls == []

    def measured_again() -> bool:
        probe.calls.clear()
        choose_precision("auto", CPU, SHAPE, probe)
        return bool(probe.calls)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert measured_again()
    finally:
        torch.set_num_threads(threads)
    assert not measured_again()
    assert bf16_speedup(ProbeShape.of(512, 2048, 8000, 2000, training=True), probe)[2] is False  # another shape
    assert bf16_speedup(ProbeShape.of(256, 1024, 8000, 2000, training=False), probe)[2] is False  # decoding
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an emulated older CPU is another CPU
    assert measured_again()
    monkeypatch.setattr(precision, "cpu_identity", lambda: "another CPU")
    assert measured_again()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert measured_again()
    assert len(json.loads(cache_file.read_text())) == 7


def test_the_cache_can_be_turned_off_and_a_damaged_one_is_measured_over(cache_file, monkeypatch):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    probe = FakeProbe()
    assert not choose_precision("auto", CPU, SHAPE, probe).cached
    assert json.loads(cache_file.read_text())  # replaced by a valid file
    monkeypatch.setenv(precision.CACHE_ENV, "off")
    assert precision.cache_path() is None
    assert not choose_precision("auto", CPU, SHAPE, probe).cached


def test_the_default_cache_is_under_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_path() == tmp_path / "transformer" / "precision.json"


def test_the_cpu_identity_tells_kinds_of_cpu_apart():
    identity = precision.cpu_identity()
    assert identity and identity == precision.cpu_identity()
    if Path("/proc/cpuinfo").exists():
        assert identity.count(" / ") == 5  # vendor, family, model, stepping, name, bf16-relevant flags


def test_the_real_probe_costs_under_a_second():
    """On the Multi30k config's shapes, training and decoding, at the two threads its runs use here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for training in (True, False):
            shape = ProbeShape.of(256, 1024, 8000, 2000, training)
            # The best of three, so that a burst of load from another process on a shared machine
            # does not count as the probe's cost.
            costs = [bf16_speedup(shape)[1] for _ in range(3)]
            assert min(costs) <= 1.0, costs
    finally:
        torch.set_num_threads(threads)


class FakeRanks:
    def __init__(self, rank: int, decided: str) -> None:
        self.rank, self.decided = rank, decided

    def gather_objects(self, obj):
        return [obj if self.rank == 0 else self.decided, obj if self.rank == 1 else None]


def test_rank_zero_decides_and_the_other_ranks_follow(monkeypatch):
    cfg = load_config(CONFIG)
    probe = FakeProbe(fp32=1.0, bf16=0.5)
    monkeypatch.setattr(precision, "measure_probe", probe)
    assert run_precision(cfg, CPU, FakeRanks(0, decided=""), None) == "bf16" and probe.calls
    probe.calls.clear()
    # Rank 1 does not measure: it takes what rank 0 decided, even where its own probe would differ.
    assert run_precision(cfg, CPU, FakeRanks(1, decided="fp32"), None) == "fp32"
    assert probe.calls == []


def test_a_borderline_answer_is_not_cached(cache_file):
    probe = FakeProbe(fp32=1.0, bf16=1.0 / (BF16_MIN_SPEEDUP + 0.05))
    assert choose_precision("auto", CPU, SHAPE, probe).precision == "bf16"
    assert not cache_file.exists()
    probe.calls.clear()
    assert not choose_precision("auto", CPU, SHAPE, probe).cached and probe.calls  # measured again
