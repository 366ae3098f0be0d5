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
                       name: str, ncc_window: int, fixed_mask_w: sitk.Image | None = None,
                       domains: tuple[sitk.Image, sitk.Image] | None = None) -> dict:
    """Local NCC and the chosen similarity, before and after, on the working grid (inside the fixed mask,
    and with ``domains``, each inside where the moving image has data before and after), with the fixed
    image's own value as a yardstick: the similarity of the fixed image with itself over the same voxels.

    Local NCC is always reported; for a multi-modal pair it is low whatever the alignment, and the
    chosen similarity is the figure to read. Local NCC of an image with itself is not 1 (flat windows
    score 0), so the figure to judge by is the share of that value reached. Before and after are one
    batch: the fixed image's features (MIND's are the costly part) are computed once."""
    def tensor(image, preset):
        return torch.from_numpy(normalise(sitk.GetArrayFromImage(image), preset))[None, None]

    def array(image):
        return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]

    weight = None if fixed_mask_w is None else array(fixed_mask_w)
    fixed = tensor(fixed_w, presets[0])
    moving = torch.cat([tensor(before_w, presets[1]), tensor(after_w, presets[1])])
    domain = None if domains is None else torch.cat([array(d) for d in domains])
    scores = {}
    with torch.no_grad():
        for sim_name in dict.fromkeys(("ncc", name)):  # local NCC once when it is the chosen similarity
            sim = similarities.make(sim_name, ncc_window)
            f, m, w, _ = similarities.prepare(sim_name, fixed, moving, weight)
            valid = None if domain is None else sim.valid(domain)
            ff = sim.features(f)
            losses = sim.loss(sim.features(m), ff, w, per_item=True, domain=valid)
            itself = sim.loss(ff, ff, w, per_item=True, domain=None if valid is None else valid[1:])
            scores[sim_name] = ([round(sim.score(v), 4) for v in losses.tolist()], round(sim.score(itself.item()), 4),
                                sim.higher_is_better)
    (ncc_before, ncc_after), ncc_self, _ = scores["ncc"]
    (before, after), itself, higher_is_better = scores[name]
    out = {"ncc_before": ncc_before, "ncc_after": ncc_after, "ncc_self": ncc_self,
           "similarity": {"name": name, "before": before, "after": after, "self": itself,
                          "higher_is_better": higher_is_better}}
    if higher_is_better and itself > 0:  # what share of the perfect match (the fixed image with itself) is reached
        out["similarity"]["share_of_self"] = round(after / itself, 3)
    return out


def domain_overlap(fixed_content: np.ndarray, moving: sitk.Image, grid: sitk.Image,
                   transform: sitk.Transform | None) -> float:
    """The share of the fixed image's content (a boolean array on ``grid``) that the moving image's field
    of view covers through ``transform``."""
    inside = sitk.GetArrayFromImage(geometry.field_of_view(moving, grid, transform)) > 0
    return round(float(inside[fixed_content].mean()), 4) if fixed_content.any() else 1.0


def quality(grid: sitk.Image, jacobian: sitk.Image, forward: sitk.Transform, inverse: sitk.Transform,
            fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
            warped_labels: sitk.Image | None = None) -> dict:
    """Folding and inverse consistency on ``grid`` (the working grid, where the field lives), Dice per
    label before/after on the fixed labels' grid."""
    out = {}
    jac = sitk.GetArrayFromImage(jacobian)
    out["folding_percent"] = round(float((jac <= 0).mean() * 100), 4)
    out["jacobian_min"] = round(float(jac.min()), 4)
    out["jacobian_max"] = round(float(jac.max()), 4)
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


# Thresholds of the quality flags, calibrated on the registration benchmark's runs and on failures made on
# purpose (2 CPU cores, this commit): good runs reached a local NCC of 0.53-1.0 of the fixed image's own
# (a real head with its skull onto the skull-stripped template: 0.53; the two real templates: 0.72-0.87;
# known warps of one template: 0.95-1.0), a head onto noise or an upside-down head 0.01-0.39; MIND
# 0.066-0.095 after good CT<->MR runs, 0.158 onto noise; mutual information 0.09-0.33 of the fixed
# image's own after good CT<->MR runs, 0.007 onto noise.
LOW_SHARE = {"ncc": 0.45, "mi": 0.03}  # of the fixed image's value with itself
HIGH_MIND = 0.125
NOT_IMPROVED = 0.01  # relative: a change smaller than this is no change
ALIGNED_SHARE = 0.9  # a pair already this close needs no improvement
SMALL_OVERLAP = 0.5
FOLDING_PERCENT = 0.1
JACOBIAN_RANGE = (0.2, 5.0)
FAR_MM, FAR_DEG = 30.0, 30.0


def warnings(metrics: dict) -> list[dict]:
    """Short codes with a sentence each, for a result that may be wrong; they never change the exit code.
    Read from ``metrics`` as ``register`` fills it."""
    out = []

    def flag(code: str, message: str) -> None:
        out.append({"code": code, "message": message})

    sim = metrics["similarity"]
    name, before, after, better = sim["name"], sim["before"], sim["after"], sim["higher_is_better"]
    share = sim.get("share_of_self")
    worse = after < before * (1 - NOT_IMPROVED) if better else after > before * (1 + NOT_IMPROVED)
    if worse and not (share is not None and share >= ALIGNED_SHARE):
        flag("similarity_not_improved", f"{name} went from {before} to {after} ({'higher' if better else 'lower'} is "
                                        "better): the registration made the match worse; check the result")
    if share is not None and share < LOW_SHARE.get(name, 0):
        flag("low_similarity", f"{name} reached {share:.2f} of the fixed image's value with itself (good registrations "
                               f"reach {LOW_SHARE[name]:.2f} or more): the images may show different anatomy, or the "
                               "registration failed")
    if name == "mind" and after > HIGH_MIND:
        flag("low_similarity", f"the MIND descriptors still differ by {after} (good CT<->MR registrations reach "
                               f"{HIGH_MIND} or less): the images may show different anatomy, or the registration "
                               "failed")
    overlap = metrics.get("overlap") or {}
    if max(overlap.get("after", 1.0), overlap.get("moving_inside", 1.0)) < SMALL_OVERLAP:
        flag("small_overlap", f"the images share little: {overlap['after']:.0%} of the fixed image's content lies in the "
                              f"moving image's field of view and {overlap['moving_inside']:.0%} of the moving image's "
                              "in the fixed one's; the result rests on that part only")
    if "tre_after" in metrics and metrics["tre_after"]["mean_mm"] > metrics["tre_before"]["mean_mm"]:
        flag("landmarks_worse", f"the landmark error grew from {metrics['tre_before']['mean_mm']} to "
                                f"{metrics['tre_after']['mean_mm']} mm: check the landmarks' coordinate system (RAS "
                                "against LPS flips x and y) and that they pair up as intended")
    if metrics.get("folding_percent", 0) > FOLDING_PERCENT:
        flag("folding", f"{metrics['folding_percent']}% of voxels fold (Jacobian determinant <= 0)")
    low, high = JACOBIAN_RANGE
    if "jacobian_min" in metrics and (metrics["jacobian_min"] < low or metrics.get("jacobian_max", 1) > high):
        flag("extreme_jacobian", f"the transform compresses or stretches volumes by more than {1 / low:g}x "
                                 f"(Jacobian determinant {metrics['jacobian_min']} to {metrics.get('jacobian_max')})")
    moved = (metrics.get("start") or {}).get("moved_from_header")
    if moved and (moved["mm"] > FAR_MM or moved["deg"] > FAR_DEG):
        flag("far_from_header", f"the result lies {moved['mm']} mm and {moved['deg']} degrees from where the images' "
                                f"headers place them, and the search took it there ({moved['why']}); if the headers "
                                "are right, rerun with --initialisation none --no-rotation-search")
    polish = metrics.get("polish")
    if polish and not polish["kept"] and polish.get("moved_mm") is not None:  # refused, not failed
        flag("polish_disagrees", f"the correlation of the original images is best {polish['moved_mm']} mm away from the "
                                 "result (the last refinement was refused): the match has more than one optimum nearby; "
                                 "check the result")
    return out
