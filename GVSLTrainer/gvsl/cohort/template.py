"""A population template built on the cohort engine, as antsMultivariateTemplateConstruction2.sh and
ants.build_template build one, with every subject of an iteration registered in parallel.

Iteration 0 registers every subject affinely onto the first and averages them. Each later iteration
registers every subject onto the current template, averages the warped subjects, and moves the
average by the inverse of the subjects' mean displacement, so that the template sits at the
cohort's mean shape instead of drifting towards one subject; a Laplacian-sharpened version replaces
it where it matches the subjects better. Each iteration's template is kept, so an interrupted build
resumes from the last complete one.
"""
from __future__ import annotations

import contextlib
import csv
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..geometry import transform_parts
from ..outputs import remove_stale, replacing, staged_files, write_csv, write_stored_gzip, write_text, writing
from ..registration_io import FILES
from ..volumes import DataError
from .engine import local_client
from .fusion import Local, local_similarity
from .subjects import Subject, subjects_from

SHARPNESS_RADIUS = 3  # voxels: the local correlation's 7^3 window
TEMPLATE = "template.nii.gz"
TABLE = "template.csv"  # one row per complete iteration
FIGURE = "template_iterations.png"
COLUMNS = ["iteration", "sharpness", "mean_displacement_mm", "sharpened", "seconds"]


# The affine start needs no more than a start's precision: the deformable iterations refine it. On a 4 mm
# working grid (unless the user's options set another: argparse keeps the last given) and without the
# last refinement on the original images, 4 of the benchmark's heads onto a fifth took 0.5-2.2 s each
# instead of 3.8-9.6 s, their transforms 0.4-0.5 mm from the full affine registration's over the head
# (about what that refinement alone moves them: 0.5 mm).
START_OPTIONS = ("--spacing", "4", "--no-polish")
# The rounds before the last move a template that the next round moves again: half the registrations'
# budget (unless the user's options give one) left the benchmark's template as sharp (0.975) and as near
# the mean shape (1.60 against 1.59 mm) in 21 % less time. The last round, whose registrations are the
# subjects' transforms to the template, keeps the full budget.
EARLY_ROUND_OPTIONS = ("--iterations", "50")


def _template_path(out: Path, iteration: int) -> Path:
    return out / "iterations" / f"template_{iteration}.nii.gz"


def _done_iterations(out: Path) -> list[dict]:
    """The rows of the iterations that are complete (their template written)."""
    table = out / TABLE
    if not table.is_file():
        return []
    rows = [{"iteration": int(r["iteration"]), "sharpness": float(r["sharpness"]),
             "mean_displacement_mm": float(r["mean_displacement_mm"]), "sharpened": r["sharpened"] == "True",
             "seconds": float(r["seconds"])} for r in csv.DictReader(table.open())]
    return [r for r in rows if _template_path(out, r["iteration"]).is_file()]


def _normalised(image: sitk.Image) -> np.ndarray:
    """A warped subject's intensities scaled by its 99th percentile inside the head, so that each
    subject weighs the same in the average whatever its scanner's scale."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = array[array > np.percentile(array, 50)]
    scale = float(np.percentile(inside, 99)) if inside.size else 1.0
    return array / (scale if scale > 0 else 1.0)


def _sharpness(template: sitk.Image, subjects: list[sitk.Image | Local]) -> float:
    """The mean local correlation of the aligned subjects with the template, over its foreground: how
    much anatomy the subjects share with it (a blurred template scores lower). ``subjects`` may come as
    their ``Local`` (radius ``SHARPNESS_RADIUS``), when several templates are scored against them."""
    array = sitk.GetArrayFromImage(template)
    foreground = array > np.percentile(array, 60)
    local = Local.of(template, SHARPNESS_RADIUS)
    return float(np.mean([np.sqrt(local_similarity(local, s, SHARPNESS_RADIUS))[foreground].mean()
                          for s in subjects]))


def _image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(reference)
    return image


def _average(folder: Path, subjects: list[Subject], grid: sitk.Image, displacement: bool):
    """The mean of the warped subjects in ``folder``, each subject aligned, and, with
    ``displacement``, the subjects' mean displacement (template point -> subject point, LPS mm)."""
    warped = [sitk.ReadImage(str(folder / s.name / "warped.nii.gz"), sitk.sitkFloat32) for s in subjects]
    mean = _image(np.mean([_normalised(w) for w in warped], axis=0), grid)
    if not displacement:
        return mean, warped, None
    fields = [sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        sitk.ReadTransform(str(folder / s.name / "transform.h5")), sitk.sitkVectorFloat64, grid.GetSize(),
        grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())) for s in subjects]
    average = sitk.GetImageFromArray(np.mean(fields, axis=0), isVector=True)
    average.CopyInformation(grid)
    return mean, warped, average


def build_template(inputs: str | Path | Sequence[Subject], output_dir: str | Path, options: Sequence[str] = (), *,
                   iterations: int = 4, sharpen: str = "auto", progress: bool = True, **engine) -> dict:
    """Build ``output_dir/template.nii.gz`` from ``inputs`` (a folder, list or CSV of subjects, or
    ``Subject``s) in ``iterations`` iterations after the affine start, with ``register.py``'s
    ``options`` (``--mode``, ``--similarity``...) for each registration; then each subject's transforms
    to the final template (``output_dir/subjects/<name>/``, see ``_subject_transforms``). ``sharpen``: auto
    (keep a Laplacian-sharpened template where the subjects match it better), always or never.
    Resumes after the last complete iteration. ``engine``: as for ``register_cohort``."""
    if sharpen not in ("auto", "always", "never"):
        raise DataError(f"sharpen must be auto, always or never, got {sharpen!r}")
    subjects = list(inputs) if not isinstance(inputs, (str, Path)) else subjects_from(inputs)
    if len(subjects) < 2:
        raise DataError(f"{inputs}: a template needs at least two subjects, got {len(subjects)}")
    out = Path(output_dir)
    (out / "iterations").mkdir(parents=True, exist_ok=True)
    rows = _done_iterations(out)
    engine = {"progress": progress, **engine}
    with contextlib.ExitStack() as stack:
        if not any(engine.get(k) for k in ("client", "scheduler", "jobqueue")):  # one local cluster for every round
            # after it is closed (its workers gone): what they left mid-subject when stopped
            stack.callback(lambda: [remove_stale(folder, f".{s.name}.partial-", "-")
                                    for folder in out.glob("iteration_*") for s in subjects])
            client, threads = stack.enter_context(local_client(engine.pop("workers", None),
                                                               engine.pop("threads_per_worker", None)))
            engine.update(client=client, threads_per_worker=threads)
        _iterate(subjects, out, options, iterations, sharpen, rows, engine)
    shutil.copyfile(_template_path(out, iterations), out / TEMPLATE)
    _subject_transforms(out, subjects, iterations)
    _figure(out, iterations)
    write_text("".join(f"{s.name}\n" for s in subjects), out / "subjects.txt")
    return {"template": out / TEMPLATE, "iterations": rows}


def _iterate(subjects: list[Subject], out: Path, options: Sequence[str], iterations: int, sharpen: str,
             rows: list[dict], engine: dict) -> None:
    """The iterations after the ``rows`` already complete, each template written as it is done."""
    from . import register_cohort

    for iteration in range(len(rows), iterations + 1):
        start = time.perf_counter()
        folder = out / f"iteration_{iteration}"
        if iteration == 0:  # all onto the first, affinely: the start
            fixed = subjects[0].image
            register_cohort(fixed, subjects, folder, [*START_OPTIONS, *options, "--mode", "affine"], **engine)
        else:
            fixed = _template_path(out, iteration - 1)
            early = EARLY_ROUND_OPTIONS if iteration < iterations else ()
            register_cohort(fixed, subjects, folder, [*early, *options], **engine)
        grid = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
        failed = [s.name for s in subjects if not (folder / s.name / "transform.h5").is_file()]
        if failed:
            raise DataError(f"iteration {iteration}: the registration of {', '.join(failed)} failed "
                            f"(see {folder / 'cohort.csv'}); fix or remove them and run again to resume")
        mean, warped, average = _average(folder, subjects, grid, displacement=iteration > 0)
        shift = 0.0
        if average is not None:  # to the mean shape: the inverse of the mean displacement
            norms = np.linalg.norm(sitk.GetArrayFromImage(average), axis=-1)
            shift = float(norms[sitk.GetArrayFromImage(mean) > 0.1].mean())
            write_stored_gzip(average, _displacement_path(out, iteration))  # the subjects' transforms need it
            inverse = _to_mean_shape(average)
            mean = sitk.Resample(mean, grid, inverse, sitk.sitkLinear, 0.0)
            warped = [sitk.Resample(w, grid, inverse, sitk.sitkLinear, 0.0) for w in warped]
        sharpened = sitk.LaplacianSharpening(mean)
        subjects_local = [Local.of(w, SHARPNESS_RADIUS) for w in warped]  # once for both candidates
        scores = {False: _sharpness(mean, subjects_local)}
        if sharpen != "never":
            scores[True] = _sharpness(sharpened, subjects_local)
        use = sharpen == "always" or (sharpen == "auto" and scores[True] > scores[False])
        template = sharpened if use else mean
        sitk.WriteImage(template, str(_template_path(out, iteration)))
        rows.append({"iteration": iteration, "sharpness": round(scores[use], 4), "mean_displacement_mm": round(shift, 3),
                     "sharpened": use, "seconds": round(time.perf_counter() - start, 1)})
        write_csv(rows, COLUMNS, out / TABLE)


def _displacement_path(out: Path, iteration: int) -> Path:
    return out / "iterations" / f"mean_displacement_{iteration}.nii.gz"


def _to_mean_shape(average: sitk.Image) -> sitk.DisplacementFieldTransform:
    """The update that moves an iteration's average to the mean shape: the inverse of the subjects'
    mean displacement (final template point -> the point of the average it shows)."""
    return sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(average))


def _subject_transforms(out: Path, subjects: list[Subject], iterations: int) -> None:
    """Each subject's transforms to the final template, in ``out/subjects/<name>/``: the last iteration's
    registration onto the template before its update, composed with the update (``transform.h5``:
    template point -> subject point, ``inverse.h5`` the other way), and the subject warped onto the
    template (``warped.nii.gz``). Composing instead of registering every subject once more saves a
    round of registrations (a fifth of a 3-iteration build)."""
    folder = out / f"iteration_{iterations}"
    template = sitk.ReadImage(str(out / TEMPLATE), sitk.sitkFloat32)
    update = average = None
    if iterations > 0:  # iteration 0's template is its average as it is
        path = _displacement_path(out, iterations)
        if path.is_file():
            average = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
        else:  # a build begun by an earlier version: from the last iteration's registrations again
            grid = sitk.ReadImage(str(_template_path(out, iterations - 1)), sitk.sitkFloat32)
            average = _average(folder, subjects, grid, displacement=True)[2]
        update = _to_mean_shape(average)
    for s in subjects:
        forward, inverse = (sitk.ReadTransform(str(folder / s.name / name)) for name in ("transform.h5", "inverse.h5"))
        if update is not None:  # ITK's composite applies its last transform first
            forward = sitk.CompositeTransform([*transform_parts(forward), update])
            inverse = sitk.CompositeTransform([sitk.DisplacementFieldTransform(sitk.Image(average)),
                                               *transform_parts(inverse)])
        warped = sitk.Resample(sitk.ReadImage(str(s.image), sitk.sitkFloat32), template, forward, sitk.sitkLinear, 0.0)
        target = out / "subjects" / s.name
        with staged_files(target, replaces=tuple(FILES.values())) as stage:  # one whole set, nothing else
            for name, write in ((FILES["transform"], lambda p: sitk.WriteTransform(forward, p)),
                                (FILES["inverse"], lambda p: sitk.WriteTransform(inverse, p)),
                                (FILES["warped"], lambda p: sitk.WriteImage(warped, p, True))):
                with writing(stage / name, target / name) as path:
                    write(str(path))


def _figure(out: Path, iterations: int) -> None:
    """Each iteration's template, three mid-slices a row."""
    from matplotlib.figure import Figure

    from ..report import _aspects, _slices

    fig = Figure(figsize=(9, 3 * (iterations + 1)), dpi=80)
    axes = fig.subplots(iterations + 1, 3, squeeze=False)
    for k in range(iterations + 1):
        image = sitk.ReadImage(str(_template_path(out, k)))
        array = sitk.GetArrayViewFromImage(image)
        hi = float(np.percentile(array, 99)) or 1.0
        for ax, view, aspect in zip(axes[k], _slices(array), _aspects(image)):
            ax.imshow(view, cmap="gray", vmin=0, vmax=hi, aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[k, 0].set_ylabel("affine start" if k == 0 else f"iteration {k}", fontsize=10)
    fig.tight_layout()
    path = out / FIGURE
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
