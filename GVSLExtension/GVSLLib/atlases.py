"""Atlases for segmentation without a model: (volume, segmentation) pairs of the scene, written as the
files ``segment.py --atlases`` reads (a CSV of images and Slicer segmentation files), or a CSV given.

Segments are matched across atlases by name, not by their order in each segmentation: the same
structure gets one label value in every atlas, and the result's segments keep the atlases' names and
colours.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import conversion, paths

paths.ensureGvslImportable()
from gvsl.labels import LabelSpec  # noqa: E402  (torch-free)
from gvsl.slicer_segmentation import as_slicer_segmentation  # noqa: E402

MIN_ATLASES = 2  # one atlas is single-atlas propagation: Register with a moving segmentation does that


def sceneAtlases(segmentations) -> list:
    """(volume, segmentation) pairs of the scene's checked segmentations: each one's volume is the one it
    was segmented on (its reference geometry, which Segment Editor sets to the source volume), None if
    it has none (``atlasesProblem`` names it)."""
    pairs = []
    for segmentation in segmentations or []:
        if segmentation is not None:
            role = segmentation.GetReferenceImageGeometryReferenceRole()
            volume = segmentation.GetNodeReference(role)
            pairs.append((volume if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") else None,
                          segmentation))
    return pairs


def atlasesProblem(atlases) -> str:
    """Why ``atlases`` (a CSV path, or a list of (volume node, segmentation node) pairs) cannot be
    used, or "" when they can."""
    if isinstance(atlases, (str, Path)):
        text = paths.chosenFile(atlases)
        if not text:
            return "Select atlases: a CSV with the columns image and labels."
        return "" if Path(text).is_file() else f"Atlas table not found: {text}"
    pairs = list(atlases or [])
    if len(pairs) < MIN_ATLASES:
        return f"Select at least {MIN_ATLASES} atlases (pairs of a volume and its segmentation)."
    for volume, segmentation in pairs:
        if segmentation is None:
            return "Every atlas needs both a volume and a segmentation."
        if volume is None:
            return (f"Atlas {segmentation.GetName()} has no source volume: select it as the source volume in "
                    "Segment Editor, or give the atlases as a CSV.")
        if not segmentation.GetSegmentation().GetNumberOfSegments():
            return f"Atlas {segmentation.GetName()} has no segments."
    return ""


def writeAtlases(atlases, folder: Path) -> Path:
    """The CSV ``segment.py --atlases`` reads: ``atlases`` itself when it is one, else the pairs' images
    (as Slicer shows them) and label maps (on their volume's grid, values by segment name) written into
    ``folder``."""
    if isinstance(atlases, (str, Path)):
        return Path(paths.chosenFile(atlases))
    folder.mkdir(parents=True, exist_ok=True)
    exported = [(volume, *conversion.labelsFromSegmentation(segmentation, volume)) for volume, segmentation in atlases]
    spec = _byName([segments for _, _, segments in exported])
    value = {name: v for v, name in zip(spec.values, spec.names)}
    rows = []
    for i, (volume, labels, segments) in enumerate(exported):
        lookup = np.array([0] + [value[name] for name, _ in segments], dtype=np.int16)  # segment order -> by name
        named = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(labels).astype(np.int64)])
        named.CopyInformation(labels)
        stem = f"{i + 1:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', volume.GetName())}"
        image_path, labels_path = folder / f"{stem}.nrrd", folder / f"{stem}.seg.nrrd"
        sitk.WriteImage(conversion.imageFromVolumeNode(volume), str(image_path))
        sitk.WriteImage(as_slicer_segmentation(named, spec), str(labels_path), True)
        rows.append({"subject": stem, "image": image_path, "labels": labels_path})
    table = folder / "atlases.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def _byName(segmentLists: list[list[tuple[str, tuple]]]) -> LabelSpec:
    """One label value per segment name (first seen, first numbered), with the first atlas's colour."""
    first = {}
    for segments in segmentLists:
        for name, colour in segments:
            first.setdefault(name, tuple(float(c) for c in colour))
    names = list(first)
    return LabelSpec(list(range(len(names) + 1)), ["background", *names],
                     [(0.0, 0.0, 0.0), *first.values()])
