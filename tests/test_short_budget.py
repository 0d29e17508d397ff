"""train.short_budget: the shorter recipe where the time cap would stop a run early in its budget."""

from __future__ import annotations

import pytest
from helpers import CONFIG

from transformer.config import ConfigError, load_config
from transformer.training.short_budget import projected_steps, resolve_short_budget


@pytest.fixture
def cfg():
    return load_config(CONFIG)


def test_the_short_budget_applies_where_too_few_steps_fit_in_the_time_cap(cfg):
    # 30 minutes: 1.0 s per step fits 1,800 steps (< 2,000), 0.5 s fits 3,600.
    assert projected_steps(cfg, 1.0) == pytest.approx(1800)
    assert projected_steps(cfg, 0.1) == 4000  # the step budget comes first
    slow = resolve_short_budget(cfg, None, 1.0)
    assert slow.train.short_budget == "on"
    assert (slow.train.max_steps, slow.train.lr_scale, slow.train.lr_decay, slow.model.dropout) == (1600, 0.7, "inverse_sqrt", 0.1)
    assert (slow.train.warmup_steps, slow.train.cooldown, slow.model.d_model) == (cfg.train.warmup_steps, cfg.train.cooldown, cfg.model.d_model)
    fast = resolve_short_budget(cfg, None, 0.5)
    assert fast.train.short_budget == "off"
    assert (fast.train.max_steps, fast.train.lr_scale, fast.model.dropout) == (4000, 0.35, 0.2)


def test_a_resumed_run_keeps_its_recorded_outcome_without_timing(cfg):
    on, off = resolve_short_budget(cfg, None, 1.0), resolve_short_budget(cfg, None, 0.1)
    assert resolve_short_budget(cfg, on, None) == on
    assert resolve_short_budget(cfg, off, None) == off
    with pytest.raises(ValueError, match="needs the measured seconds"):
        resolve_short_budget(cfg, None, None)


def test_without_a_time_cap_auto_is_off_and_nothing_is_timed():
    uncapped = load_config(CONFIG, ["train.max_minutes=0"])
    assert resolve_short_budget(uncapped, None, None).train.short_budget == "off"


def test_on_and_off_are_taken_as_given(cfg):
    forced = load_config(CONFIG, ["train.short_budget=on"])
    assert resolve_short_budget(forced, None, None).train.max_steps == 1600
    kept = load_config(CONFIG, ["train.short_budget=off"])
    assert resolve_short_budget(kept, None, None) == kept


@pytest.mark.parametrize("override, message", [
    ("train.short_budget=maybe", "train.short_budget must be 'auto', 'on' or 'off'"),
    ("train.short_budget_dropout=1.5", "train.short_budget_dropout must be in [0, 1)"),
    ("train.short_budget_lr_decay=cosine", "train.short_budget_lr_decay must be"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        load_config(CONFIG, [override])
