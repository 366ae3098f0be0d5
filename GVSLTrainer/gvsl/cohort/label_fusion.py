"""Multi-atlas segmentation: every atlas registered onto the target on the cohort engine, its labels
carried along, then fused (``fusion.fuse``). No trained model is needed."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from ..labels import PALETTE, LabelSpec
from ..slicer_segmentation import as_slicer_segmentation, is_segmentation_file, segments_in
from ..volumes import DataError, read_volume
from .fusion import METHODS, fuse
from .subjects import Subject, subjects_from

ATLAS_ROLES = ("labels",)


def atlases_from(source: str | Path) -> list[Subject]:
    """The atlases of a CSV with the columns ``image`` and ``labels`` (and optionally ``subject``)."""
    atlases = subjects_from(source, "image", ATLAS_ROLES, named=False)
    unlabelled = [a.name for a in atlases if "labels" not in a.files]
    if unlabelled:
        raise DataError(f"{source}: atlas {unlabelled[0]!r} has no 'labels' (every atlas needs its label map)")
    return atlases


def label_spec(values: list[int], atlas_files: list[Path]) -> LabelSpec:
    """Names and colours of the fused values: from the first atlas that is a Slicer segmentation with
    them in its header, else label_<value> and the palette."""
    names, colours = {0: "background"}, {0: (0.0, 0.0, 0.0)}
    for path in atlas_files:
        for value, (name, colour) in segments_in(path).items():
            names.setdefault(value, name)
            if colour is not None:
                colours.setdefault(value, colour)
    return LabelSpec(values, [names.get(v, f"label_{v}") for v in values],
                     [colours.get(v, PALETTE[(i - 1) % len(PALETTE)]) for i, v in enumerate(values)])


def label_fusion(target: str | Path, atlases: str | Path | Sequence[Subject], output: str | Path,
                 options: Sequence[str] = (), *, method: str = "weighted", probabilities: str | Path | None = None,
                 work_dir: str | Path | None = None, **engine) -> dict:
    """Segment ``target`` by registering every atlas onto it (``register.py``'s ``options``, on the
    cohort engine: ``engine`` as for ``register_cohort``) and fusing their labels by ``method``.
    Writes ``output`` (a .seg.nrrd gets segment names and colours), one probability map per label
    into ``probabilities`` on request, and ``<output>.atlases.csv``: each atlas's registration status
    and its agreement with the result. The registrations go to ``work_dir`` (default
    ``<output>.registrations/``), where a rerun finds them."""
    from ..outputs import check_image_output, check_output_folder, write_csv, write_image, write_image_folder
    from . import register_cohort

    if method not in METHODS:
        raise DataError(f"label fusion method must be one of {', '.join(METHODS)}, got {method!r}")
    output = check_image_output(output, (target,))
    if probabilities:
        check_output_folder(probabilities)
    atlases = list(atlases) if not isinstance(atlases, (str, Path)) else atlases_from(atlases)
    work = Path(work_dir) if work_dir else output.with_name(f"{output.name}.registrations")
    subjects = [Subject(a.name, a.image, {"moving_labels": a.files["labels"]}) for a in atlases]
    rows = register_cohort(target, subjects, work, options, **engine)
    done = [(a, r) for a, r in zip(atlases, rows) if r["status"] != "failed"]
    for _, row in ((a, r) for a, r in zip(atlases, rows) if r["status"] == "failed"):
        warnings.warn(f"atlas {row['subject']} left out: its registration failed ({row['error']})", stacklevel=2)
    if not done:
        raise DataError(f"no atlas could be registered onto {target} (see {work / 'cohort.csv'})")
    target_image = read_volume(target)
    warped = [sitk.ReadImage(str(work / a.name / "warped.nii.gz")) for a, _ in done]
    labels = [sitk.ReadImage(str(work / a.name / "warped_labels.nii.gz")) for a, _ in done]
    fused = fuse(target_image, warped, labels, method, probabilities=bool(probabilities))
    spec = label_spec(fused.values, [a.files["labels"] for a, _ in done])
    result = as_slicer_segmentation(fused.labels, spec) if is_segmentation_file(output) else fused.labels
    write_image(result, output)
    if probabilities:
        write_image_folder({f"probability_{name}.nii.gz": p for name, p in zip(spec.names, fused.probabilities)},
                           probabilities)
    agreement = dict(zip((a.name for a, _ in done), fused.agreement))
    write_csv([{**row, "atlas": atlas.name, "agreement_dice": "" if agreement.get(atlas.name) is None else
                round(agreement[atlas.name], 4)} for atlas, row in zip(atlases, rows)],
              ["atlas", "status", "agreement_dice", "local_ncc_after", "error"], output.with_name(f"{output.name}.atlases.csv"))
    return {"output": output, "atlases": len(done), "failed": len(atlases) - len(done), "values": fused.values,
            "names": spec.names, "colours": spec.colours, "agreement": agreement, "registrations": work}
