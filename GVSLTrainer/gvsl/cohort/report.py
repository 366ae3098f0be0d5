"""cohort_report.png: a cohort's registrations judged at a glance.

The atlas next to the mean of the warped subjects (a sharp mean is a well-aligned cohort), each
subject's quality figures with the outliers named, and each warped subject's mid-slice under the
atlas's outline.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..outputs import replacing
from ..report import DPI, _aspects, _displayed_slices

REPORT = "cohort_report.png"
GRID_SUBJECTS = 36  # mid-slices drawn; outliers and the worst first
GRID_COLUMNS = 9


def _windowed_slices(path: Path, atlas: sitk.Image) -> list[np.ndarray] | None:
    """The three mid-slices of a warped image in [0, 1] (1-99 % window), or None when it is not on the
    atlas's grid (a subject with its own fixed image)."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if image.GetSize() != atlas.GetSize() or not np.allclose(image.GetOrigin(), atlas.GetOrigin(), atol=1e-3):
        return None
    return _displayed_slices(image)


def cohort_report(atlas_path: str | Path, output_dir: Path, rows: list[dict], flagged: dict[str, str]) -> Path | None:
    """Draw ``output_dir/cohort_report.png`` from the subjects' warped images (``<subject>/warped.nii.gz``)
    and ``rows`` (cohort.csv's); None when no subject is complete."""
    from matplotlib.figure import Figure

    complete = [r for r in rows if r["status"] != "failed" and (output_dir / r["subject"] / "warped.nii.gz").is_file()]
    if not complete:
        return None
    atlas = sitk.ReadImage(str(atlas_path), sitk.sitkFloat32)
    atlas_slices = _displayed_slices(atlas)
    with ThreadPoolExecutor(4) as pool:  # SimpleITK reads without the GIL
        warped = dict(zip([r["subject"] for r in complete],
                          pool.map(lambda r: _windowed_slices(output_dir / r["subject"] / "warped.nii.gz", atlas), complete)))
    warped = {k: v for k, v in warped.items() if v is not None}
    order = sorted(warped, key=lambda name: (name not in flagged, _ncc(rows, name)))[:GRID_SUBJECTS]
    grid_rows = -(-len(order) // GRID_COLUMNS)

    fig = Figure(figsize=(16, 7.5 + 1.9 * grid_rows), dpi=DPI)
    outer = fig.add_gridspec(3, 1, height_ratios=[4.2, 3.0, 1.9 * max(grid_rows, 1)], hspace=0.35)
    top = outer[0].subgridspec(1, 6, wspace=0.05)
    aspects = _aspects(atlas)
    mean = [np.mean([w[i] for w in warped.values()], axis=0) for i in range(3)] if warped else None
    for i in range(3):
        for j, (title, slices) in enumerate((("atlas", atlas_slices), (f"mean of {len(warped)} warped", mean))):
            ax = fig.add_subplot(top[0, 3 * j + i])
            ax.set_xticks([])
            ax.set_yticks([])
            if slices is not None:
                ax.imshow(slices[i], cmap="gray", aspect=aspects[i])
            if i == 1:
                ax.set_title(title, fontsize=11)
    _quality_plots(fig, outer[1], rows, flagged)
    grid = outer[2].subgridspec(max(grid_rows, 1), GRID_COLUMNS, wspace=0.04, hspace=0.25)
    level = _outline_level(atlas_slices[0])
    for n, name in enumerate(order):
        ax = fig.add_subplot(grid[n // GRID_COLUMNS, n % GRID_COLUMNS])
        ax.imshow(warped[name][0], cmap="gray", aspect=aspects[0])
        ax.contour(atlas_slices[0], levels=[level], colors="lime", linewidths=0.6)
        ax.set_title(name, fontsize=8, color="red" if name in flagged else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    failed = sum(r["status"] == "failed" for r in rows)
    fig.suptitle(f"{len(complete)} of {len(rows)} subjects registered, {failed} failed, {len(flagged)} outlier(s)"
                 + (f"; mid-slices of {len(order)} (outliers first)" if len(warped) > len(order) else ""), fontsize=12)
    path = output_dir / REPORT
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def _ncc(rows: list[dict], name: str) -> float:
    value = next((r.get("local_ncc_after") for r in rows if r["subject"] == name), "")
    return float(value) if value not in (None, "") else 0.0


def _outline_level(atlas_slice: np.ndarray) -> float:
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(atlas_slice.astype(np.float32)))
    return float(otsu.GetThreshold())


def _quality_plots(fig, cell, rows: list[dict], flagged: dict[str, str]) -> None:
    """Local NCC after and folding per subject, outliers in red and named, failed subjects marked."""
    axes = cell.subgridspec(1, 2, wspace=0.15).subplots()
    x = np.arange(len(rows))
    for ax, column, label in ((axes[0], "local_ncc_after", "local NCC after (higher is better)"),
                              (axes[1], "folding_percent", "folding (% of voxels)")):
        values = np.array([float(r[column]) if r.get(column) not in (None, "") else np.nan for r in rows])
        colours = ["red" if r["subject"] in flagged else "tab:blue" for r in rows]
        ax.scatter(x, np.nan_to_num(values), c=colours, s=18)
        for i, r in enumerate(rows):
            if r["status"] == "failed":
                ax.axvline(i, color="grey", linestyle=":", linewidth=1)
            elif r["subject"] in flagged:
                ax.annotate(r["subject"], (i, values[i]), fontsize=7, color="red", xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("subject (dotted: failed)", fontsize=9)
        ax.tick_params(labelsize=8)
