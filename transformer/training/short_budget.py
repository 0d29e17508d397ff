"""A shorter recipe for machines on which the time cap would stop a run early in its step budget.

A recipe tuned for its full step budget (a constant learning rate and strong dropout, which learn
slowly at first and pay off late) does worse than a faster-learning one when a slow machine's time
cap stops it at a fraction of those steps: on Multi30k, a CPU that fits about 1,700 of 4,000 steps
in 30 minutes scores higher with the paper's decaying schedule, less dropout and a 1,600-step
budget (docs/results.md). With `train.short_budget: auto`, the run times its first steps, projects
the steps that `train.max_minutes` allows, and trains with the `train.short_budget_*` settings
where fewer than `train.short_budget_below` would fit. The run's config.yaml records the outcome
("on" or "off", with the settings it trained with), which a resumed run keeps.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from transformer.config import Config

log = logging.getLogger(__name__)


def with_short_budget(cfg: Config) -> Config:
    """`cfg` with its `train.short_budget_*` settings in place of the ones they stand for, and
    `train.short_budget` set to "on"."""
    tc = cfg.train
    return replace(
        cfg,
        model=replace(cfg.model, dropout=tc.short_budget_dropout),
        train=replace(tc, short_budget="on", max_steps=tc.short_budget_max_steps, lr_scale=tc.short_budget_lr_scale,
                      lr_decay=tc.short_budget_lr_decay),
    )


def projected_steps(cfg: Config, seconds_per_step: float) -> float:
    """The steps a run of `cfg` takes at `seconds_per_step`: those `train.max_minutes` allows, or
    `train.max_steps` if that comes first."""
    tc = cfg.train
    steps = tc.max_minutes * 60 / max(seconds_per_step, 1e-9)
    return min(steps, tc.max_steps) if tc.max_steps else steps


def resolve_short_budget(cfg: Config, recorded: Config | None, seconds_per_step: float | None) -> Config:
    """`cfg` with `train.short_budget` resolved to "on" (and its settings applied) or "off".

    Args:
        cfg: the run's config.
        recorded: the config a resumed run's checkpoint holds (None for a new run): its outcome is
            kept, never decided again.
        seconds_per_step: the training step's measured time; needed only when the setting is "auto",
            nothing is recorded and `train.max_minutes` is set.
    """
    setting = cfg.train.short_budget
    if recorded is not None and setting == "auto":
        setting = recorded.train.short_budget if recorded.train.short_budget != "auto" else "off"
    elif setting == "auto" and not cfg.train.max_minutes:  # no time cap: the whole step budget runs
        setting = "off"
    elif setting == "auto":
        if seconds_per_step is None:
            raise ValueError("train.short_budget=auto needs the measured seconds per step")
        steps = projected_steps(cfg, seconds_per_step)
        setting = "on" if steps < cfg.train.short_budget_below else "off"
        log.info("short budget: %s (%.2f s per step, so about %d steps in train.max_minutes=%g; the short budget "
                 "is used below %d)", setting, seconds_per_step, steps, cfg.train.max_minutes,
                 cfg.train.short_budget_below)
    if setting == "on":
        shorter = with_short_budget(cfg)
        log.info("training with the short budget: train.max_steps=%d train.lr_scale=%g train.lr_decay=%s "
                 "model.dropout=%g", shorter.train.max_steps, shorter.train.lr_scale, shorter.train.lr_decay,
                 shorter.model.dropout)
        return shorter
    return replace(cfg, train=replace(cfg.train, short_budget="off"))
