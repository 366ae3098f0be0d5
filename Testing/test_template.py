"""Population templates: the template lies at the subjects' mean shape, and a build resumes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import synthetic
from gvsl.cohort.template import build_template
from gvsl.registration import RegistrationOptions, register

OPTIONS = ["--iterations", "30", "--spacing", "4"]


def smooth_field(reference: sitk.Image, seed: int, peak_mm: float) -> np.ndarray:
    """A smooth random displacement (LPS mm, (z, y, x, 3)) on ``reference``'s grid: random vectors on a
    5^3 grid over it, interpolated, scaled to ``peak_mm`` at most."""
    rng = np.random.default_rng(seed)
    coarse = sitk.GetImageFromArray(rng.standard_normal((5, 5, 5, 3)), isVector=True)
    extent = (np.array(reference.GetSize()) - 1) * np.array(reference.GetSpacing())
    coarse.SetSpacing((extent / 4).tolist())
    coarse.SetOrigin(reference.GetOrigin())
    coarse.SetDirection(reference.GetDirection())
    field = sitk.GetArrayFromImage(sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkBSpline, 0.0,
                                                 sitk.sitkVectorFloat64))
    return field * peak_mm / np.abs(field).max()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A head at 4 mm (the mean shape) and four subjects: it warped by +f, -f, +g and -g."""
    folder = tmp_path_factory.mktemp("template")
    head = synthetic.mni_at(4.0)
    (folder / "scans").mkdir()
    for name, seed, sign in (("a", 1, 1), ("b", 1, -1), ("c", 2, 1), ("d", 2, -1)):
        field = sitk.GetImageFromArray((sign * smooth_field(head, seed, 6.0)).astype(np.float64), isVector=True)
        field.CopyInformation(head)
        subject = sitk.Resample(head, head, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
        sitk.WriteImage(subject, str(folder / "scans" / f"{name}.nii.gz"))
    built = build_template(folder / "scans", folder / "out", OPTIONS, iterations=2, progress=False)
    return folder, head, built


def distance_to(head: sitk.Image, image: sitk.Image) -> float:
    """How far ``image``'s shape lies from ``head``'s: the mean displacement of a deformable registration
    of one onto the other, inside the head."""
    transform = register(head, image, options=RegistrationOptions(iterations=60, spacing=4.0)).transform
    field = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, head.GetSize(), head.GetOrigin(), head.GetSpacing(), head.GetDirection()))
    inside = sitk.GetArrayFromImage(head) > 0.15 * sitk.GetArrayFromImage(head).max()
    return float(np.linalg.norm(field, axis=-1)[inside].mean())


def test_the_template_lies_closer_to_the_mean_shape_than_any_subject(cohort):
    folder, head, built = cohort
    template = sitk.ReadImage(str(built["template"]))
    subjects = [sitk.ReadImage(str(folder / "scans" / f"{n}.nii.gz")) for n in "abcd"]
    ours = distance_to(head, template)
    theirs = [distance_to(head, s) for s in subjects]
    assert ours < min(theirs), (ours, theirs)
    rows = list(csv.DictReader((folder / "out" / "template.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2]
    assert float(rows[2]["sharpness"]) > float(rows[0]["sharpness"])  # the deformable iterations sharpen it
    for name in "abcd":
        assert (folder / "out" / "subjects" / name / "transform.h5").is_file()
    assert (folder / "out" / "template_iterations.png").stat().st_size > 10_000


def test_an_interrupted_build_resumes_and_gives_the_same_template(cohort, tmp_path):
    folder, _, built = cohort
    build_template(folder / "scans", tmp_path / "out", OPTIONS, iterations=1, progress=False)  # stopped after 1
    resumed = build_template(folder / "scans", tmp_path / "out", OPTIONS, iterations=2, progress=False)
    assert [r["iteration"] for r in resumed["iterations"]] == [0, 1, 2]
    ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (resumed["template"], built["template"]))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_each_subjects_transforms_lead_to_the_final_template(cohort):
    """``subjects/<name>/transform.h5`` (the last iteration's registration composed with the template's
    update) maps the final template onto the subject: SimpleITK resampling the subject through it
    matches the template better than the subject does, and ``inverse.h5`` undoes it."""
    folder, head, built = cohort
    template = sitk.ReadImage(str(built["template"]), sitk.sitkFloat32)
    inside = sitk.GetArrayFromImage(template) > 0.15 * sitk.GetArrayFromImage(template).max()

    def correlation(image: sitk.Image) -> float:
        a, b = sitk.GetArrayFromImage(image)[inside], sitk.GetArrayFromImage(template)[inside]
        return float(np.corrcoef(a, b)[0, 1])

    physical = [template.TransformIndexToPhysicalPoint([int(i) for i in index])
                for index in np.argwhere(inside)[::40, ::-1]]
    errors = []
    for name, seed, sign in (("a", 1, 1), ("b", 1, -1), ("c", 2, 1), ("d", 2, -1)):
        subject = sitk.ReadImage(str(folder / "scans" / f"{name}.nii.gz"), sitk.sitkFloat32)
        forward = sitk.ReadTransform(str(folder / "out" / "subjects" / name / "transform.h5"))
        inverse = sitk.ReadTransform(str(folder / "out" / "subjects" / name / "inverse.h5"))
        warped = sitk.Resample(subject, template, forward, sitk.sitkLinear, 0.0)
        assert correlation(warped) > correlation(sitk.Resample(subject, template)) + 0.01, name
        written = sitk.ReadImage(str(folder / "out" / "subjects" / name / "warped.nii.gz"))
        np.testing.assert_allclose(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(warped), atol=1e-4)
        moved = [np.linalg.norm(np.subtract(inverse.TransformPoint(forward.TransformPoint(p)), p)) for p in physical]
        # the registration's own inverse consistency plus the update's inversion, on a 4 mm grid
        assert np.mean(moved) < 0.25 and np.percentile(moved, 95) < 0.6, (name, np.mean(moved), np.max(moved))
        # against the truth: the subject is the head (near the template) warped by x + f(x), so the
        # template's point x shows in the subject at (id + f)^-1 (x); the last iteration's registration
        # alone, onto the template before its update, lies further from it
        field = sitk.GetImageFromArray((sign * smooth_field(head, seed, 6.0)).astype(np.float64), isVector=True)
        field.CopyInformation(head)
        truth = sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(field, 50, 1e-4, 1e-4))
        before = sitk.ReadTransform(str(folder / "out" / "iteration_2" / name / "transform.h5"))
        errors.append({key: np.mean([np.linalg.norm(np.subtract(t.TransformPoint(p), truth.TransformPoint(p)))
                                     for p in physical]) for key, t in (("composed", forward), ("before", before))})
    composed, before = (np.mean([e[key] for e in errors]) for key in ("composed", "before"))
    assert composed < before - 0.1, errors  # 1.16 against 1.36 mm


def test_the_registrations_budget_has_its_own_flag(monkeypatch, tmp_path):
    """``--iterations`` counts the template's iterations; register.py's ``--iterations`` (its optimiser
    budget) is ``--registration-iterations``, so that neither swallows the other."""
    from gvsl.cohort import template
    from gvsl.commands import cohort

    seen = {}

    def fake(inputs, output_dir, options, **kwargs):
        seen.update(options=list(options), **kwargs)
        return {"template": Path(output_dir) / "template.nii.gz",
                "iterations": [{"sharpness": 0.9, "mean_displacement_mm": 0.1}]}

    monkeypatch.setattr(template, "build_template", fake)
    args, options = cohort.parse(["template", "--input", str(tmp_path), "--output-dir", str(tmp_path / "out"),
                                  "--iterations", "2", "--registration-iterations", "50", "--mode", "affine"])
    assert cohort.job(args, options) == 0
    assert seen["iterations"] == 2 and seen["options"] == ["--mode", "affine", "--iterations", "50"]


def test_a_finished_build_begun_without_the_saved_update_still_composes_the_same_transforms(cohort, tmp_path):
    """A build whose last iteration left no ``mean_displacement`` file (an earlier version's) gets the
    update again from that iteration's registrations: the same transforms, no registration rerun."""
    import shutil

    folder, _, _ = cohort
    shutil.copytree(folder / "out", tmp_path / "out")
    (tmp_path / "out" / "iterations" / "mean_displacement_2.nii.gz").unlink()
    shutil.rmtree(tmp_path / "out" / "subjects")
    # a client that fails on any use: nothing is registered again
    build_template(folder / "scans", tmp_path / "out", OPTIONS, iterations=2, progress=False, client=object())
    for name in "ab":
        ours, theirs = (sitk.ReadTransform(str(out / "subjects" / name / "transform.h5"))
                        for out in (tmp_path / "out", folder / "out"))
        point = (10.0, -20.0, 15.0)
        np.testing.assert_allclose(ours.TransformPoint(point), theirs.TransformPoint(point), atol=1e-6)
