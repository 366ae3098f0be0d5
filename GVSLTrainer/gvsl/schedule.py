"""Learning-rate schedules: a pure function of the step, so a resumed run continues them exactly."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "poly")
POLY_POWER = 0.9  # nnU-Net's


def warmup_length(warmup_steps: int, total_steps: int) -> int:
    """The warm-up actually used: at most a tenth of the run, so a short run still decays."""
    return max(0, min(warmup_steps, total_steps // 10))


def learning_rate(step: int, base: float, total_steps: int, schedule: str = "poly", warmup_steps: int = 0) -> float:
    """The rate for optimisation step ``step`` (0-based): a linear warm-up from base / warm-up to
    ``base``, then constant, or a cosine or polynomial decay that reaches zero at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    warmup = warmup_length(warmup_steps, total_steps)
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress) ** POLY_POWER
