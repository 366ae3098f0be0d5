"""Which subjects of a cohort stand out from the others: a robust z-score of each quality figure."""
from __future__ import annotations

import numpy as np

OUTLIER_Z = 3.5  # Iglewicz and Hoaglin's cut-off for the modified z-score
MIN_SUBJECTS = 5  # fewer give no usable spread
# cohort.csv's column, the direction that is worse, and a value the column must pass to count
# (a cohort with no folding at all would otherwise flag 0.01 %)
MEASURES = (("local_ncc_after", -1, None, "local NCC after"),
            ("dice_mean", -1, None, "mean Dice"),
            ("folding_percent", 1, 0.1, "folding %"),
            ("inverse_consistency_mm", 1, 0.5, "inverse consistency error (mm)"))


def robust_z(values: np.ndarray) -> np.ndarray:
    """0.6745 (x - median) / MAD; with a zero MAD (over half the values equal), the mean absolute
    deviation stands in (scaled to the same normal spread); all equal: zeros."""
    values = np.asarray(values, dtype=float)
    deviation = values - np.median(values)
    mad = np.median(np.abs(deviation))
    if mad > 0:
        return 0.6745 * deviation / mad
    mean_deviation = np.abs(deviation).mean()
    return deviation / (1.2533 * mean_deviation) if mean_deviation > 0 else np.zeros_like(values)


def outliers(rows: list[dict]) -> dict[str, str]:
    """{subject: why} for the complete subjects whose quality figures lie beyond OUTLIER_Z robust
    standard deviations from the cohort's, on the worse side."""
    found: dict[str, list[str]] = {}
    for column, worse, floor, label in MEASURES:
        known = [(r["subject"], float(r[column])) for r in rows
                 if r.get("status") != "failed" and r.get(column) not in (None, "")]
        if len(known) < MIN_SUBJECTS:
            continue
        z = robust_z(np.array([v for _, v in known]))
        for (name, value), score in zip(known, z):
            if worse * score > OUTLIER_Z and (floor is None or value > floor):
                found.setdefault(name, []).append(f"{label} {value:g} (robust z {score:+.1f})")
    return {name: "; ".join(reasons) for name, reasons in found.items()}
