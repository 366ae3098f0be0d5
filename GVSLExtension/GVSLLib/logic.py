"""GVSLLogic: register and segment MRML volumes with gvsl, in this process or in a child process.

In-process calls (``register``, ``segment``) hand SimpleITK images to gvsl, with no temporary
files; the GUI uses ``startRegistration`` / ``startSegmentation``, which run the headless scripts
in a separate Python process so Slicer stays responsive. Both paths end in the same node builders,
and nodes are created only after the computation succeeded.
"""
from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

import slicer

from . import conversion, paths, placement
from .atlases import atlasesProblem, writeAtlases
from .process import BackgroundProcess, pythonExecutable
from .sceneguard import NewNodes

paths.ensureGvslImportable()
from gvsl.choices import DEVICES, MODES, SIMILARITIES  # noqa: E402  (torch-free: the GUI needs no torch)

try:  # the application's base class where there is one (Slicer), a plain object under pytest
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:
    ScriptedLoadableModuleLogic = object

Progress = Callable[[str, float], None]  # (stage, fraction done)


def temporaryFolder(prefix: str) -> Path:
    """A new folder for one run's files: in Slicer's temporary folder (its application settings), as
    SlicerElastix does; the system's where there is no application (slicer-core, tests)."""
    if hasattr(slicer, "app"):
        root = Path(slicer.app.temporaryPath) / "GVSL"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    return Path(tempfile.mkdtemp(prefix=prefix))


@dataclass
class RegistrationNodes:
    outputVolume: object  # the moving volume resampled onto the fixed grid; None when none was asked
    #                       for, and the moving volume was placed under ``transform`` instead (placement)
    transform: object  # maps the moving volume onto the fixed one (Slicer's "from parent" = fixed -> moving)
    affineTransform: object = None  # linear part, when the transforms are split; its parent is the grid part
    deformableTransform: object = None  # grid (displacement field) part, applied first
    segmentation: object = None  # the moving segmentation propagated into fixed space
    metrics: dict = field(default_factory=dict)


@dataclass
class _RegistrationOutputs:
    """What the node builders need, from ``gvsl.registration.register`` or from register.py's files."""
    warped: sitk.Image
    affine: sitk.AffineTransform
    displacement: sitk.Image | None  # None: a rigid or affine registration
    warped_labels: sitk.Image | None
    metrics: dict

    @classmethod
    def fromFolder(cls, folder: Path) -> "_RegistrationOutputs":
        from gvsl.registration_io import FILES

        labels, field = folder / FILES["warped_labels"], folder / FILES["displacement"]
        return cls(sitk.ReadImage(str(folder / FILES["warped"])),
                   sitk.ReadTransform(str(folder / FILES["affine"])).Downcast(),
                   sitk.ReadImage(str(field), sitk.sitkVectorFloat64) if field.exists() else None,
                   sitk.ReadImage(str(labels)) if labels.exists() else None,
                   json.loads((folder / FILES["metrics"]).read_text()))


@dataclass
class _RegistrationInputs:
    fixed: sitk.Image
    moving: sitk.Image
    movingLabels: sitk.Image | None
    segments: dict  # {label value: (name, colour)} of movingLabels
    extra: dict  # register()'s optional keywords, landmarks as (points, labels, name)


class BackgroundJob:
    """A headless script running in a child process; ``finish()`` turns its files into nodes."""

    def __init__(self, argv: list[str], workdir: Path, finish: Callable[[Path], object], keep: bool = False):
        self.workdir = workdir
        self.keep = keep  # keep the temporary files (inputs, the script's outputs) for debugging
        self._finish = finish
        self.process = BackgroundProcess(argv)

    def finish(self):
        """The result nodes (call once ``process.poll()`` returned 0); the temporary files go."""
        try:
            if self.process.poll() != 0:
                raise RuntimeError(self.process.error() or "the GVSL process failed")
            return self._finish(self.workdir / "out")
        finally:
            self.cleanup()

    def cancel(self) -> None:
        """Stop at once; the temporary files go once the process has gone (it may hold them open)."""
        self.process.cancel(then=self.cleanup)

    def cleanup(self) -> None:
        if self.keep:
            logging.info(f"GVSL: temporary files kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class GVSLLogic(ScriptedLoadableModuleLogic):
    def __init__(self, scene=None):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene or slicer.mrmlScene
        paths.ensureGvslImportable()

    # ---------------------------------------------------------------- checks
    @staticmethod
    def registrationInputsProblem(fixedVolume, movingVolume, model=None, mode: str = "deformable",
                                  outputTransform=None, splitTransforms: bool = False, fixedLandmarks=None,
                                  movingLandmarks=None, outputVolume=None, initialTransform=None) -> str:
        """Why registration cannot run with these inputs ("" when it can); the GUI shows it as a tooltip,
        so a run is refused before it starts, not after."""
        if fixedVolume is None or movingVolume is None:
            return "Select a fixed and a moving volume."
        if fixedVolume is movingVolume:
            return "The fixed and the moving volume are the same node."
        if outputVolume is not None and outputVolume in (fixedVolume, movingVolume):
            return (f"{outputVolume.GetName()}: the output volume would overwrite an input; pick another volume or "
                    "create a new one.")
        placed = placement.placementProblem(fixedVolume, movingVolume, initialTransform)
        if placed:
            return placed
        if model and not Path(model).is_file():
            return f"Model file not found: {model}"
        if mode not in MODES:
            return f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}."
        if (mode == "deformable" and not splitTransforms and outputTransform is not None
                and outputTransform.IsA("vtkMRMLLinearTransformNode")):
            return (f"{outputTransform.GetName()}: a linear transform node cannot hold a deformable result; pick "
                    "another output transform, a rigid or affine mode, or split the transforms.")
        if (fixedLandmarks is None) != (movingLandmarks is None):
            return "Select both fixed and moving landmarks, or neither."
        return ""

    @staticmethod
    def segmentationInputsProblem(inputVolume, model, atlases=None) -> str:
        """``atlases``: instead of a model, a CSV path or (volume, segmentation) node pairs."""
        if inputVolume is None:
            return "Select a volume to segment."
        if model and _given(atlases):
            return "Choose a model or atlases, not both."
        if _given(atlases):
            return atlasesProblem(atlases)
        if not model:
            return "Select a fine-tuned model (gvsl_segmentation.pt from finetune.py), or atlases."
        if not Path(model).is_file():
            return f"Model file not found: {model}"
        return ""

    @staticmethod
    def _require(problem: str) -> None:
        if problem:
            raise ValueError(problem)

    def _startBackground(self, prefix: str, script: str, arguments: Callable[[Path], list],
                         finish: Callable[[Path], object], keepTemporaryFiles: bool = False) -> BackgroundJob:
        """Run ``script`` of the trainer on ``arguments(workdir)`` in a child process; the temporary
        folder goes again if writing the inputs fails."""
        workdir = temporaryFolder(prefix)
        try:
            argv = [pythonExecutable(), paths.trainerDir() / script, *arguments(workdir)]
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return BackgroundJob([str(a) for a in argv], workdir, finish, keepTemporaryFiles)

    # ---------------------------------------------------------------- registration
    def register(self, fixedVolume, movingVolume, model=None, outputVolume=None, outputTransform=None,
                 splitTransforms: bool = False, iterations: int | None = None, device: str = "auto",
                 movingSegmentation=None, progress: Progress | None = None, similarity: str = "auto",
                 mode: str = "deformable", fixedMask=None, movingMask=None, initialTransform=None,
                 fixedLandmarks=None, movingLandmarks=None) -> RegistrationNodes:
        """Register ``movingVolume`` onto ``fixedVolume`` in this process (blocking). Without an
        ``outputVolume`` no resampled copy is made: the moving volume is placed under the result.

        ``fixedMask`` / ``movingMask``: segmentation or labelmap nodes; ``initialTransform``: a linear
        transform node (fixed -> moving, as it would sit on the moving volume; by default the linear
        transform the moving volume already sits under, see ``placement``); ``fixedLandmarks`` /
        ``movingLandmarks``: markups point lists (their TRE goes into the metrics)."""
        from gvsl import checkpoint
        from gvsl.registration import Landmarks, RegistrationOptions, register

        inputs = self._registrationInputs(fixedVolume, movingVolume, model, mode, outputVolume, outputTransform,
                                          splitTransforms, movingSegmentation, fixedMask, movingMask,
                                          initialTransform, fixedLandmarks, movingLandmarks)
        extra = dict(inputs.extra)
        for key in ("fixed_landmarks", "moving_landmarks"):
            if key in extra:
                points, labels, name = extra[key]
                extra[key] = Landmarks(points, labels, name)
        options = RegistrationOptions(device=device, similarity=similarity, mode=mode)
        if iterations:
            options.iterations = int(iterations)
        result = register(inputs.fixed, inputs.moving, None, inputs.movingLabels,
                          checkpoint.load(model) if model else None, options, progress, **extra)
        outputs = _RegistrationOutputs(result.warped, result.affine, result.displacement, result.warped_labels,
                                       result.metrics)
        return self._registrationNodes(outputs, fixedVolume, movingVolume, outputVolume, outputTransform,
                                       splitTransforms, inputs.segments, movingSegmentation)

    def startRegistration(self, fixedVolume, movingVolume, model=None, outputVolume=None, outputTransform=None,
                          splitTransforms: bool = False, iterations: int | None = None, device: str = "auto",
                          movingSegmentation=None, similarity: str = "auto", mode: str = "deformable",
                          fixedMask=None, movingMask=None, initialTransform=None, fixedLandmarks=None,
                          movingLandmarks=None, keepTemporaryFiles: bool = False) -> BackgroundJob:
        """The same registration in a child process running ``register.py`` on temporary files (kept
        with ``keepTemporaryFiles``, for debugging)."""
        inputs = self._registrationInputs(fixedVolume, movingVolume, model, mode, outputVolume, outputTransform,
                                          splitTransforms, movingSegmentation, fixedMask, movingMask,
                                          initialTransform, fixedLandmarks, movingLandmarks)

        def arguments(workdir: Path) -> list:
            argv = ["--output-dir", workdir / "out",
                    "--fixed", self._write(inputs.fixed, workdir / "fixed.nrrd"),
                    "--moving", self._write(inputs.moving, workdir / "moving.nrrd"), "--device", device,
                    "--similarity", similarity, "--mode", mode]
            argv += _extraFiles(inputs.extra, workdir)
            if inputs.movingLabels is not None:
                argv += ["--moving-labels", self._write(inputs.movingLabels, workdir / "moving_labels.nrrd")]
            if model:
                argv += ["--model", model]
            if iterations:
                argv += ["--iterations", int(iterations)]
            return argv

        def finish(folder: Path) -> RegistrationNodes:
            return self._registrationNodes(_RegistrationOutputs.fromFolder(folder), fixedVolume, movingVolume,
                                           outputVolume, outputTransform, splitTransforms, inputs.segments,
                                           movingSegmentation)

        return self._startBackground("gvsl_register_", "register.py", arguments, finish, keepTemporaryFiles)

    def loadRegistration(self, folder: str | Path, fixedVolume, movingVolume, outputVolume=None,
                         outputTransform=None, splitTransforms: bool = False,
                         segments: dict | None = None) -> RegistrationNodes:
        """Nodes from the files of a headless ``register.py`` run (``segments``: {value: (name, colour)}
        for warped_labels)."""
        return self._registrationNodes(_RegistrationOutputs.fromFolder(Path(folder)), fixedVolume, movingVolume,
                                       outputVolume, outputTransform, splitTransforms, segments or {})

    def _registrationInputs(self, fixedVolume, movingVolume, model, mode, outputVolume, outputTransform,
                            splitTransforms, movingSegmentation, fixedMask, movingMask, initialTransform,
                            fixedLandmarks, movingLandmarks) -> "_RegistrationInputs":
        """The checked inputs as SimpleITK images, transforms and LPS points, read where ``placement``
        says: the fixed volume where Slicer shows it, the moving one as stored, from its starting transform."""
        self._require(self.registrationInputsProblem(
            fixedVolume, movingVolume, model, mode, outputTransform, splitTransforms, fixedLandmarks,
            movingLandmarks, outputVolume, initialTransform))
        movingLabels, segments = None, {}
        if movingSegmentation is not None:
            movingLabels, names = conversion.labelsFromSegmentation(movingSegmentation)  # its own resolution
            segments = {i + 1: s for i, s in enumerate(names)}
        extra = {}
        if fixedMask is not None:
            extra["fixed_mask"] = conversion.maskFromNode(fixedMask)
        if movingMask is not None:
            extra["moving_mask"] = conversion.maskFromNode(movingMask)
        start = placement.startingTransform(movingVolume, initialTransform)
        if start is not None:
            extra["initial_transform"] = conversion.linearTransformFromNode(start)
        for key, node in (("fixed_landmarks", fixedLandmarks), ("moving_landmarks", movingLandmarks)):
            if node is not None:
                extra[key] = (*conversion.pointsFromMarkups(node), node.GetName())
        return _RegistrationInputs(conversion.imageFromVolumeNode(fixedVolume),
                                   conversion.imageFromVolumeNode(movingVolume, throughParent=False),
                                   movingLabels, segments, extra)

    def _registrationNodes(self, outputs: _RegistrationOutputs, fixedVolume, movingVolume, outputVolume,
                           outputTransform, splitTransforms: bool, segments: dict,
                           movingSegmentation=None) -> RegistrationNodes:
        linear = outputs.displacement is None
        if (not linear and not splitTransforms and outputTransform is not None
                and outputTransform.IsA("vtkMRMLLinearTransformNode")):
            raise ValueError(f"{outputTransform.GetName()}: a linear transform node cannot hold the deformable "
                             "registration; pick another transform node, create a new one, or split the transforms")
        name = movingVolume.GetName()
        with NewNodes(self.scene) as new:
            volume = None
            if outputVolume is not None:
                volume = conversion.volumeNodeFromImage(outputs.warped, outputVolume)
                volume.SetAndObserveTransformNodeID(None)  # it lies on the fixed grid, in world coordinates
            affine = deformable = None
            if linear:  # rigid or affine: one linear node, which Slicer can harden
                transform = outputTransform or new.add("vtkMRMLLinearTransformNode", f"{name} to {fixedVolume.GetName()}")
                placement.releaseGridPart(transform)
                conversion.linearTransformToNode(outputs.affine, transform)
            elif splitTransforms:
                # a reused linear node keeps the grid node an earlier split run put above it: no orphans
                deformable = placement.earlierGridPart(outputTransform) or new.add("vtkMRMLGridTransformNode",
                                                                                   f"{name} deformable")
                conversion.gridTransformToNode(outputs.displacement, deformable)
                deformable.SetAttribute(placement.GRID_PART, "1")
                affine = conversion.linearTransformToNode(
                    outputs.affine, outputTransform or new.add("vtkMRMLLinearTransformNode", f"{name} affine"))
                affine.SetAndObserveTransformNodeID(deformable.GetID())  # the field applies first
                transform = affine
            else:
                transform = outputTransform or new.add("vtkMRMLTransformNode", f"{name} to {fixedVolume.GetName()}")
                placement.releaseGridPart(transform)
                conversion.compositeTransformToNode(outputs.affine, outputs.displacement, transform)
            segmentation = None
            if outputs.warped_labels is not None:
                segmentation = (placement.propagatedSegmentation(self.scene, movingSegmentation, fixedVolume)
                                if movingSegmentation is not None else None) \
                    or new.add("vtkMRMLSegmentationNode", f"{name} segmentation registered")
                conversion.segmentationFromLabels(outputs.warped_labels, segments, segmentation)
                placement.referenceSourceVolume(segmentation, fixedVolume, movingSegmentation)
        transform.SetAttribute(placement.METRICS, json.dumps(outputs.metrics))
        placement.referenceVolumes(transform, fixedVolume, movingVolume)
        placement.showThroughResult(movingVolume, transform, volume)
        return RegistrationNodes(volume, transform, affine, deformable, segmentation, outputs.metrics)

    # ---------------------------------------------------------------- segmentation
    def segment(self, inputVolume, model, outputSegmentation=None, device: str = "auto",
                progress: Progress | None = None):
        """Segment ``inputVolume`` with a fine-tuned model in this process; returns the segmentation node."""
        from gvsl import checkpoint
        from gvsl.segmentation import SegmentationOptions, segment

        self._require(self.segmentationInputsProblem(inputVolume, model))
        result = segment(conversion.imageFromVolumeNode(inputVolume), checkpoint.load(model),
                         SegmentationOptions(device=device), progress or False)
        return self._segmentationNode(result.labels, result.spec.as_dict(), inputVolume, outputSegmentation)

    def startSegmentation(self, inputVolume, model=None, outputSegmentation=None, device: str = "auto",
                          keepTemporaryFiles: bool = False, atlases=None) -> BackgroundJob:
        """The same segmentation in a child process running ``segment.py`` on temporary files. Slicer's
        process neither imports torch nor loads the model: the child writes the classes' names and
        colours next to the label map, and a wrong model fails there, first. With ``atlases`` (a CSV
        with the columns image and labels, or (volume, segmentation) node pairs) instead of a model,
        the child registers every atlas onto the volume and fuses their labels (``segment.py
        --atlases``); segments are matched across atlases by name."""
        self._require(self.segmentationInputsProblem(inputVolume, model, atlases))

        def arguments(workdir: Path) -> list:
            image = conversion.imageFromVolumeNode(inputVolume)
            source = ["--atlases", writeAtlases(atlases, workdir / "atlases")] if _given(atlases) else ["--model", model]
            return [*source, "--input", self._write(image, workdir / "input.nrrd"),
                    "--output", workdir / "out" / "labels.nrrd", "--classes", workdir / "out" / "classes.json",
                    "--device", device]

        def finish(folder: Path):
            return self._segmentationNode(sitk.ReadImage(str(folder / "labels.nrrd")),
                                          json.loads((folder / "classes.json").read_text()), inputVolume,
                                          outputSegmentation)

        return self._startBackground("gvsl_segment_", "segment.py", arguments, finish, keepTemporaryFiles)

    def _segmentationNode(self, labels: sitk.Image, classes: dict, inputVolume, outputSegmentation):
        """``classes``: {"values", "names", "colours"} of the model (``LabelSpec.as_dict()``)."""
        segments = {v: (n, tuple(c)) for v, n, c in zip(classes["values"], classes["names"], classes["colours"])
                    if v != 0}
        with NewNodes(self.scene) as new:
            node = outputSegmentation or new.add("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} segmentation")
            conversion.segmentationFromLabels(labels, segments, node)
            placement.referenceSourceVolume(node, inputVolume)
            node.CreateClosedSurfaceRepresentation()  # shown in 3D too, as TotalSegmentator does
        return node

    @staticmethod
    def _write(image: sitk.Image, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
        return path


def _given(atlases) -> bool:
    """Whether atlases were chosen: a CSV path (``paths.chosenFile``), or pairs."""
    return bool(paths.chosenFile(atlases) if isinstance(atlases, (str, Path)) else atlases)


def _extraFiles(extra: dict, workdir: Path) -> list:
    """register.py's arguments for the optional inputs, written as files (landmarks as LPS CSV)."""
    import csv

    argv = []
    for key, flag in (("fixed_mask", "--fixed-mask"), ("moving_mask", "--moving-mask")):
        if key in extra:
            sitk.WriteImage(extra[key], str(workdir / f"{key}.nrrd"))
            argv += [flag, workdir / f"{key}.nrrd"]
    if "initial_transform" in extra:
        sitk.WriteTransform(extra["initial_transform"], str(workdir / "initial.tfm"))
        argv += ["--initial-transform", workdir / "initial.tfm"]
    for key, flag in (("fixed_landmarks", "--fixed-landmarks"), ("moving_landmarks", "--moving-landmarks")):
        if key in extra:
            points, labels, _ = extra[key]
            with open(workdir / f"{key}.csv", "w", newline="") as f:
                f.write("# CoordinateSystem = LPS\n")
                writer = csv.writer(f)
                writer.writerow(["label", "x", "y", "z"])
                writer.writerows([label, *map(repr, map(float, p))] for label, p in zip(labels, points))
            argv += [flag, workdir / f"{key}.csv"]
    return argv


def formatMetrics(metrics: dict) -> str:
    """The quality figures of a registration (the headless metrics.json) as rich text for the GUI."""
    inverse = metrics.get("inverse_consistency_mm") or {}
    similarity = metrics.get("similarity") or {}
    share = f"; {similarity['share_of_self']:.0%} of the fixed image's own" \
        if similarity.get("name") == "ncc" and "share_of_self" in similarity else ""
    rows = [("Local NCC", f"{metrics['ncc_before']} → {metrics['ncc_after']} (before → after{share})"),
            ("Folding", f"{metrics['folding_percent']} % of voxels (Jacobian min {metrics.get('jacobian_min')})"),
            ("Inverse consistency", f"{inverse.get('mean')} mm mean, {inverse.get('p95')} mm 95th percentile"),
            ("Run time", f"{metrics['runtime_s']} s on {metrics['device']}")]
    if similarity and similarity.get("name") != "ncc":
        better = "higher" if similarity.get("higher_is_better") else "lower"
        rows.insert(0, (f"Similarity ({similarity['name']})",
                        f"{similarity['before']} → {similarity['after']} ({better} is better)"))
    if "tre_after" in metrics:
        rows.insert(0, ("Landmark error", f"{metrics['tre_before']['mean_mm']} → {metrics['tre_after']['mean_mm']} mm "
                                          f"mean (max {metrics['tre_after']['max_mm']} mm)"))
    for label, after in (metrics.get("dice_after") or {}).items():
        rows.append((f"Dice {label}", f"{metrics['dice_before'][label]} → {after}"))
    warnings = [f'<b style="color:#c00000">Warning ({html.escape(w["code"])}):</b> {html.escape(w["message"])}'
                for w in metrics.get("warnings", [])]
    return "<br>".join(warnings + [f"<b>{name}:</b> {value}" for name, value in rows])
