"""Writing a registration result as the files every ITK-based tool reads."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from .outputs import staged_files, write_stored_gzip, writing
from .report import registration_panels, registration_report

if TYPE_CHECKING:  # only for the annotation: reading the file names must not import torch (Slicer's GUI does)
    from .registration import RegistrationResult
    from .report_process import ReportProcess

FILES = {"warped": "warped.nii.gz", "transform": "transform.h5", "inverse": "inverse.h5", "affine": "affine.tfm",
         "displacement": "displacement.nii.gz", "warped_labels": "warped_labels.nii.gz",
         "metrics": "metrics.json", "report": "report.png"}


def save_registration(result: RegistrationResult, fixed: sitk.Image, output_dir: str | Path,
                      drawer: ReportProcess | None = None) -> dict[str, Path]:
    """Write every output into ``output_dir`` at once (nothing half-written on failure); ``drawer``
    draws report.png while the other files are written (from the panels ``send_panels`` gave it
    during the registration, if it did), else this process draws it."""
    output_dir = Path(output_dir)
    with staged_files(output_dir, replaces=tuple(FILES.values())) as stage:
        def file(key: str):  # one output, checked (a full disk, a cut-off file), named by its final place
            return writing(stage / FILES[key], output_dir / FILES[key])

        if drawer is not None:
            if not drawer.has_panels:
                send_panels(drawer, fixed, result.before, result.warped, result.figure_jacobian, result.landmarks,
                            result.outlines)
            drawer.save(stage / FILES["report"], result.metrics)
        with file("warped") as path:
            sitk.WriteImage(result.warped, str(path))
        for key, transform in (("transform", result.transform), ("inverse", result.inverse),
                               ("affine", result.affine)):
            with file(key) as path:
                sitk.WriteTransform(transform, str(path))
        if result.displacement is not None:  # none in the linear modes
            with file("displacement") as path:  # float32: half the bytes, 1e-6 mm
                write_stored_gzip(sitk.Cast(result.displacement, sitk.sitkVectorFloat32), path)
        if result.warped_labels is not None:
            with file("warped_labels") as path:
                sitk.WriteImage(result.warped_labels, str(path))
        with file("metrics") as path:
            path.write_text(json.dumps(finite(result.metrics), indent=2, allow_nan=False))
        with file("report") as path:
            if drawer is not None:
                drawer.wait()
            else:
                registration_report(fixed, result.before, result.warped, result.figure_jacobian, path, result.metrics,
                                    result.landmarks, result.outlines)
        written = {k: output_dir / v for k, v in FILES.items() if (stage / v).exists()}
    return written  # an earlier run's other outputs (its warped_labels, say) are gone: one whole set


def send_panels(drawer: ReportProcess, fixed: sitk.Image, before: sitk.Image, warped: sitk.Image,
                jacobian: sitk.Image | None, landmarks: dict | None, outlines: dict | None = None) -> None:
    """Give ``drawer`` the figure's images to render (``register``'s ``on_images`` with ``fixed`` bound)."""
    drawer.panels(registration_panels(fixed, before, warped, jacobian, landmarks, outlines))


def finite(value, missing: list[str] | None = None, name: str = ""):
    """``value`` with NaN and infinities as None: JSON has no NaN (a bare NaN makes metrics.json unreadable
    to strict parsers), and null says "no figure". The dotted names of those figures go to ``missing``."""
    if isinstance(value, dict):
        return {k: finite(v, missing, f"{name}.{k}" if name else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, missing, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if missing is not None:
            missing.append(name)
        return None
    return value


def summary(metrics: dict, moving_name: str, fixed_name: str) -> str:
    """What a person reads after a run: what was done, from which start, and how well it matched."""
    sim = metrics["similarity"]
    arrow = "higher is better" if sim["higher_is_better"] else "lower is better"
    yardstick = f"; {sim['share_of_self']:.0%} of the fixed image's own {sim['self']}" if "share_of_self" in sim else \
        f"; the fixed image with itself: {sim['self']}"
    lines = [f"Registered {moving_name} to {fixed_name} ({metrics['mode']}) in {metrics['runtime_s']} s on "
             f"{metrics['device']}",
             f"  similarity: {sim['name']} ({sim['reason']}); {sim['before']} -> {sim['after']} ({arrow}{yardstick}); "
             f"local NCC {metrics['ncc_before']} -> {metrics['ncc_after']}",
             f"  normalisation: fixed {metrics['normalize']['fixed']}, moving {metrics['normalize']['moving']}"]
    start = metrics["start"]
    search = start.get("rotation_search")
    taken = f"; the search kept {search['start']} and {search['taken']} ({search['taken_deg']} degrees)" \
        if search else ""
    first = "the initial transform, then " if start["initial_transform"] else ""
    lines.append(f"  start: {first}centring by {start['centring']}{taken}")
    overlap = metrics.get("overlap")
    if overlap and overlap["after"] < 0.98:
        lines.append(f"  field of view: the moving image covers {overlap['after']:.0%} of the fixed image's content "
                     f"(a partial field of view: similarities count only where both images have data)")
    if "tre_after" in metrics:
        lines.append(f"  landmarks: TRE {metrics['tre_before']['mean_mm']} -> {metrics['tre_after']['mean_mm']} mm "
                     f"(max {metrics['tre_after']['max_mm']} mm)")
    if "dice_after" in metrics:
        pairs = [f"{k} {metrics['dice_before'][k]:.3f} -> {v:.3f}" for k, v in metrics["dice_after"].items()
                 if v is not None and metrics["dice_before"].get(k) is not None]
        lines.append("  Dice: " + ", ".join(pairs))
    missing: list[str] = []
    finite(metrics, missing)
    if missing:
        lines.append(f"  not computed: {', '.join(missing)} (NaN or infinite, written as null in metrics.json; usually "
                     "no image content where the two images overlap)")
    if metrics["mode"] != "deformable":
        lines.append(f"  {metrics['mode']} mode: no displacement field written; transform.h5 is the linear "
                     "transform alone (Slicer can harden it)")
    else:
        lines.append(f"  folding {metrics['folding_percent']}% of voxels")
    for warning in metrics.get("warnings", []):
        lines.append(f"  WARNING [{warning['code']}]: {warning['message']}")
    return "\n".join(lines)
