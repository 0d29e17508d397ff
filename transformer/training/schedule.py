"""Learning-rate schedules: the paper's warm-up and inverse square root (section 5.3, equation 3) or
a constant rate after the same warm-up, and an optional linear cool-down over the end of a fixed
training budget."""

from __future__ import annotations


def noam_lr(step: int, d_model: int, warmup_steps: int, scale: float = 1.0, decay: str = "inverse_sqrt") -> float:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5).

    Linear warm-up for `warmup_steps` steps, then decay proportional to the inverse square root of
    the step number (`decay="inverse_sqrt"`, the paper's), or the warm-up's peak held constant
    (`decay="none"`; with a cool-down, the warm-up/stable/decay schedule). Steps count from 1
    (step 0 is treated as step 1).
    """
    step = max(step, 1)
    if decay == "none":
        step = min(step, warmup_steps)
    elif decay != "inverse_sqrt":
        raise ValueError(f"decay must be 'inverse_sqrt' or 'none', got {decay!r}")
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def cooldown_factor(progress: float, cooldown: float) -> float:
    """Multiplier that takes the learning rate linearly to 0 over the last `cooldown` of training.

    progress: the fraction of the training budget already used, in [0, 1].
    cooldown: the final fraction of the budget over which to decay; 0 disables the cool-down.
    Returns 1 until progress reaches 1 - cooldown, then (1 - progress) / cooldown, never below 0.
    """
    if cooldown <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / cooldown))
