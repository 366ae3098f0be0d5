"""Writing a registration result as the files every ITK-based tool reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from .outputs import staged_files
from .report import registration_report

if TYPE_CHECKING:  # only for the annotation: reading the file names must not import torch (Slicer's GUI does)
    from .registration import RegistrationResult

FILES = {"warped": "warped.nii.gz", "transform": "transform.h5", "inverse": "inverse.h5", "affine": "affine.tfm",
         "displacement": "displacement.nii.gz", "warped_labels": "warped_labels.nii.gz",
         "metrics": "metrics.json", "report": "report.png"}


def save_registration(result: RegistrationResult, fixed: sitk.Image, output_dir: str | Path) -> dict[str, Path]:
    """Write every output into ``output_dir`` at once (nothing half-written on failure)."""
    output_dir = Path(output_dir)
    with staged_files(output_dir) as stage:
        sitk.WriteImage(result.warped, str(stage / FILES["warped"]))
        sitk.WriteTransform(result.transform, str(stage / FILES["transform"]))
        sitk.WriteTransform(result.inverse, str(stage / FILES["inverse"]))
        sitk.WriteTransform(result.affine, str(stage / FILES["affine"]))
        sitk.WriteImage(result.displacement, str(stage / FILES["displacement"]))
        if result.warped_labels is not None:
            sitk.WriteImage(result.warped_labels, str(stage / FILES["warped_labels"]))
        (stage / FILES["metrics"]).write_text(json.dumps(result.metrics, indent=2))
        registration_report(fixed, result.before, result.warped, result.jacobian, stage / FILES["report"],
                            result.metrics)
        written = {k: output_dir / v for k, v in FILES.items() if (stage / v).exists()}
    return written
