"""Figures that tell whether a registration worked: similarity, overlap, folding, inverse consistency."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .. import geometry, similarity as similarities
from ..volumes import normalise


def jacobian_determinant(displacement: sitk.Image | None, affine_det: float, grid: sitk.Image) -> sitk.Image:
    """det J of the fixed -> moving mapping on ``grid`` (constant in the linear modes)."""
    if displacement is None:
        out = sitk.Image(grid.GetSize(), sitk.sitkFloat64) + affine_det
        out.CopyInformation(grid)
        return out
    return sitk.DisplacementFieldJacobianDeterminant(displacement) * affine_det


def dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> dict[str, float | None]:
    out = {}
    for v in labels:
        x, y = a == v, b == v
        denom = x.sum() + y.sum()
        out[str(v)] = float(2 * (x & y).sum() / denom) if denom else None
    return out


def similarity_figures(fixed_w: sitk.Image, before_w: sitk.Image, after_w: sitk.Image, presets: tuple[str, str],
                       name: str, ncc_window: int, fixed_mask_w: sitk.Image | None = None) -> dict:
    """Local NCC and the chosen similarity, before and after, on the working grid (inside the fixed mask).

    Local NCC is always reported; for a multi-modal pair it is low whatever the alignment, and the
    chosen similarity is the figure to read. Before and after are one batch: the fixed image's
    features (MIND's are the costly part) are computed once."""
    def tensor(image, preset):
        return torch.from_numpy(normalise(sitk.GetArrayFromImage(image), preset))[None, None]

    weight = None if fixed_mask_w is None else torch.from_numpy(
        sitk.GetArrayFromImage(fixed_mask_w).astype(np.float32))[None, None]
    fixed = tensor(fixed_w, presets[0])
    moving = torch.cat([tensor(before_w, presets[1]), tensor(after_w, presets[1])])
    scores = {}
    with torch.no_grad():
        for sim_name in dict.fromkeys(("ncc", name)):  # local NCC once when it is the chosen similarity
            sim = similarities.make(sim_name, ncc_window)
            f, m, w, _ = similarities.prepare(sim_name, fixed, moving, weight)
            losses = sim.loss(sim.features(m), sim.features(f), w, per_item=True)
            scores[sim_name] = ([round(sim.score(v), 4) for v in losses.tolist()], sim.higher_is_better)
    (ncc_before, ncc_after), _ = scores["ncc"]
    (before, after), higher_is_better = scores[name]
    out = {"ncc_before": ncc_before, "ncc_after": ncc_after,
           "similarity": {"name": name, "before": before, "after": after, "higher_is_better": higher_is_better}}
    return out


def quality(grid: sitk.Image, jacobian: sitk.Image, forward: sitk.Transform, inverse: sitk.Transform,
            fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
            warped_labels: sitk.Image | None = None) -> dict:
    """Folding and inverse consistency on ``grid`` (the working grid, where the field lives), Dice per
    label before/after on the fixed labels' grid."""
    out = {}
    jac = sitk.GetArrayFromImage(jacobian)
    out["folding_percent"] = round(float((jac <= 0).mean() * 100), 4)
    out["jacobian_min"] = round(float(jac.min()), 4)
    round_trip = sitk.CompositeTransform([inverse, forward])  # forward first, then inverse
    err = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        round_trip, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection()))
    norms = np.linalg.norm(err, axis=-1)
    out["inverse_consistency_mm"] = {"mean": round(float(norms.mean()), 4),
                                     "p95": round(float(np.percentile(norms, 95)), 4)}
    if fixed_labels is not None and moving_labels is not None:
        fl = sitk.GetArrayFromImage(fixed_labels)
        labels = [int(v) for v in np.unique(fl) if v != 0]
        moved_before = sitk.GetArrayFromImage(geometry.resample(moving_labels, fixed_labels, None,
                                                                sitk.sitkNearestNeighbor, 0))
        out["dice_before"] = dice(fl, moved_before, labels)
        if warped_labels is not None:
            on_fixed = sitk.GetArrayFromImage(geometry.resample(warped_labels, fixed_labels, None,
                                                                sitk.sitkNearestNeighbor, 0))
            out["dice_after"] = dice(fl, on_fixed, labels)
    return out
