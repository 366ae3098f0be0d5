"""Finding, checking, preprocessing, caching and cropping the unlabelled volumes of pre-training."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Transform
from torch.utils.data import Dataset

from . import geometry
from .outputs import write_text
from .discovery import discover, is_image, resolve  # noqa: F401 - discover: what pretrain.py calls
from .volumes import (CT_WINDOW, IMAGE_SUFFIXES, MIN_SIZE, MR_PERCENTILES, PRESETS, DataError,  # noqa: F401
                      auto_preset, normalise, read_labels, read_volume)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into the network's input; part of the cache key and of checkpoints."""
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    normalize: str = "mr"  # ct | mr | auto: each image its own (``auto_preset``)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return self.prepare(read_volume(path), str(path))[1]

    def preset(self, image: sitk.Image) -> str:
        return auto_preset(image) if self.normalize == "auto" else self.normalize

    def prepare(self, image: sitk.Image, source: str = "image") -> tuple[sitk.Image, torch.Tensor]:
        """(the image on the network's grid, its normalised (D, H, W) tensor)."""
        preset = self.preset(image)
        if self.normalize == "auto":
            _chosen[source] = preset
        image = geometry.canonical(image, self.spacing)
        if min(image.GetSize()) < MIN_SIZE:
            raise DataError(f"{source}: is only {'x'.join(map(str, image.GetSize()))} voxels at "
                            f"{self.spacing[0]} mm; at least {MIN_SIZE} per axis are needed")
        return image, torch.from_numpy(normalise(sitk.GetArrayFromImage(image), preset))


_chosen: dict[str, str] = {}  # the preset ``auto`` chose for each image this process prepared


def presets_line(normalize: str, presets: dict) -> str:
    """The opening line that says how the images are normalised."""
    if normalize != "auto":
        return f"Normalisation: {normalize} for every image (--normalize)"
    counts = chosen_presets(presets)
    return (f"Normalisation: auto, each image its own: {counts.get('ct', 0)} as CT (Hounsfield units), "
            f"{counts.get('mr', 0)} as MR-like (percentiles)")


def chosen_presets(presets: dict) -> dict[str, int]:
    """How many images ``auto`` normalised as each preset, for the checkpoint and the opening lines."""
    return dict(Counter(presets.values()))


def labels_on_image_grid(image: sitk.Image, labels: sitk.Image, image_path, label_path) -> sitk.Image:
    """``labels`` on its image's grid. A label map on another grid (a resampled export, another spacing)
    is resampled by nearest neighbour, with a warning, when it covers the image; otherwise refused,
    with the fix named."""
    same = (image.GetSize() == labels.GetSize()
            and np.allclose(image.GetSpacing(), labels.GetSpacing(), rtol=1e-4)
            and np.allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-4))
    if same:
        return labels
    geometry_ = (f"its geometry (size {labels.GetSize()}, spacing {tuple(round(s, 4) for s in labels.GetSpacing())}) "
                 f"differs from its image {image_path} (size {image.GetSize()}, spacing "
                 f"{tuple(round(s, 4) for s in image.GetSpacing())})")
    corners = [image.TransformContinuousIndexToPhysicalPoint([(n - 1) * c for n, c in zip(image.GetSize(), corner)])
               for corner in np.ndindex(2, 2, 2)]
    inside = [labels.TransformPhysicalPointToContinuousIndex(p) for p in corners]
    if not all(-0.5 - 1e-3 <= i <= n - 0.5 + 1e-3 for index in inside for i, n in zip(index, labels.GetSize())):
        raise DataError(f"{label_path}: {geometry_}, and it does not cover the image; resample it onto its image's "
                        "grid with nearest-neighbour interpolation (Slicer: Resample Image (BRAINS) with "
                        "--interpolationMode NearestNeighbor; SimpleITK: sitk.Resample(labels, image, "
                        "sitk.Transform(), sitk.sitkNearestNeighbor))")
    warnings.warn(f"{label_path}: {geometry_}; resampled onto the image's grid (nearest neighbour)", stacklevel=2)
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


class _CacheItem(Transform):
    """Deterministic, so PersistentDataset caches its result (it re-runs plain callables every time)."""

    def __init__(self, preprocessing: Preprocessing, spec=None):
        self.preprocessing, self.spec = preprocessing, spec

    def __call__(self, item: dict):
        if "label" not in item:
            return self.preprocessing(item["image"])
        image, labels = read_volume(item["image"]), read_labels(item["label"])
        labels = labels_on_image_grid(image, labels, item["image"], item["label"])
        grid, volume = self.preprocessing.prepare(image, item["image"])
        on_grid = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        classes = self.spec.to_classes(sitk.GetArrayFromImage(on_grid), item["label"])
        dtype = np.uint8 if self.spec.num_classes <= 256 else np.int16  # 300 classes do not fit a byte
        return {"image": volume, "label": torch.from_numpy(classes.astype(dtype)),
                "class_voxels": class_voxels(classes, self.spec.num_classes)}


def class_voxels(classes: np.ndarray, num_classes: int) -> list[torch.Tensor]:
    """Flat indices of each class's voxels (int32; class 0, the background, left empty): found once,
    when a case is cached, so that crops centred on a class cost nothing to place."""
    flat = classes.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(num_classes + 1))
    return [torch.zeros(0, dtype=torch.int32)] + [torch.from_numpy(order[bounds[c]:bounds[c + 1]].astype(np.int32))
                                                  for c in range(1, num_classes)]


class VolumeStore:
    """Preprocessed volumes, decoded once and cached on disk (MONAI PersistentDataset).

    Bad files are reported and left out; training goes on with the rest.
    """

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, cache_dir: str | Path,
                 progress: bool = True, labels: Sequence[Path] | None = None, spec=None):
        from monai.data import PersistentDataset
        from tqdm.auto import tqdm

        self.preprocessing = preprocessing
        items = []
        for i, p in enumerate(paths):
            item = {"image": str(Path(p).resolve()), **_identity(p), "spacing": preprocessing.spacing,
                    "normalize": preprocessing.normalize}
            if labels is not None:
                item.update(label=str(Path(labels[i]).resolve()), label_id=_identity(labels[i]),
                            spec=spec.as_dict(), cache_format=2)  # 2: with each class's voxel indices
            items.append(item)
        cache = Path(cache_dir)
        created = not cache.exists()
        cache.mkdir(parents=True, exist_ok=True)
        self._dataset = PersistentDataset(items, transform=_CacheItem(preprocessing, spec), cache_dir=cache_dir)
        self.paths: list[Path] = []
        self.skipped: dict[Path, str] = {}
        self._index: list[int] = []
        try:
            for i in tqdm(range(len(items)), desc="Preparing volumes", unit="vol", disable=not progress):
                try:
                    self._dataset[i]
                except Exception as e:  # MONAI wraps the transform's error: raise the cause, which names the file
                    cause = _root_cause(e)
                    if not isinstance(cause, DataError):
                        raise cause from None
                    self.skipped[Path(paths[i])] = str(cause)
                    warnings.warn(f"skipping {cause}", stacklevel=2)
                    continue
                self._index.append(i)
                self.paths.append(Path(paths[i]))
            if not self._index:
                raise DataError(f"none of the {len(items)} images could be used: "
                                + "; ".join(self.skipped.values()))
            self.presets = self._presets(items, cache)
        except BaseException:
            if created and not any(cache.iterdir()):
                cache.rmdir()  # a failed first run leaves no empty cache behind
            raise

    def _presets(self, items: list[dict], cache: Path) -> dict[Path, str]:
        """Each kept image's normalisation preset. Under ``auto``, what was chosen as it was prepared, or,
        for an image read from the cache, what the cache's presets.json recorded then."""
        if self.preprocessing.normalize != "auto":
            return {path: self.preprocessing.normalize for path in self.paths}
        record = cache / "presets.json"
        known = json.loads(record.read_text()) if record.is_file() else {}
        presets = {}
        for path, i in zip(self.paths, self._index):
            key = json.dumps([items[i]["image"], items[i]["bytes"], items[i]["mtime"]])
            known[key] = _chosen.pop(items[i]["image"], None) or known.get(key) or \
                self.preprocessing.preset(read_volume(items[i]["image"]))
            presets[path] = known[key]
        write_text(json.dumps(known, indent=1), record)
        return presets

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int):
        """A (D, H, W) tensor, or {"image", "label"} tensors for labelled volumes."""
        return self._dataset[self._index[i]]

    def skipped_summary(self) -> str:
        """For a run's closing lines: the files left out and why ("" when none were), so a skip seen
        once as a warning during preparation is counted where the user reads the result."""
        if not self.skipped:
            return ""
        return (f"Skipped {len(self.skipped)} of {len(self.skipped) + len(self)} cases:\n"
                + "\n".join(f"  {reason}" for reason in self.skipped.values()))


def _identity(path) -> dict:
    stat = Path(path).stat()
    return {"mtime": stat.st_mtime_ns, "bytes": stat.st_size}


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def pad_to(volume: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """(``volume`` zero-padded, centred, along its last three axes to at least ``size``, the padding per axis)."""
    pad = [max(0, s - v) for s, v in zip(size, volume.shape[-3:])]
    if any(pad):
        volume = torch.nn.functional.pad(volume, [q for p in reversed(pad) for q in (p // 2, p - p // 2)])
    return volume, pad


def crop_at(volume: torch.Tensor, size: Sequence[int], position: Sequence[float]) -> torch.Tensor:
    """The ``size`` crop of a (D, H, W) volume at a relative ``position`` in [0, 1) per axis (0: the first
    start, towards 1: the last), zero-padded (centred) where the volume is smaller."""
    volume, _ = pad_to(volume, size)
    start = [min(v - s, int(p * (v - s + 1))) for v, s, p in zip(volume.shape, size, position)]
    return volume[tuple(slice(a, a + s) for a, s in zip(start, size))]


class PairCrops(Dataset):
    """Sample ``index`` -> (fixed crop, moving crop) of two random volumes, (1, D, H, W) each.

    Both crops are taken at the same relative position, so that they show corresponding anatomy when
    the volumes cover one body region (on the canonical grid their axes agree), as the reference's
    whole-volume pairs do. Crops drawn independently show unrelated anatomy whenever the crop is much
    smaller than the volume, and there is then nothing to register. Deterministic in (seed, index), so
    a resumed or distributed run draws the same pairs whatever the number of DataLoader workers.
    """

    def __init__(self, store: VolumeStore, crop: Sequence[int], seed: int, length: int):
        self.store, self.crop, self.seed, self.length = store, tuple(crop), seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        a, b = rng.integers(0, len(self.store), size=2)
        position = rng.random(3)
        fixed = crop_at(self.store[int(a)], self.crop, position)
        moving = crop_at(self.store[int(b)], self.crop, position)
        return fixed.unsqueeze(0).float(), moving.unsqueeze(0).float()


class StepSampler(torch.utils.data.Sampler):
    """Sample indices of steps ``start..end`` for one rank: ((step * world + rank) * batch + j)."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.end, self.batch, self.rank, self.world = start, end, batch_size, rank, world_size

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.batch

    def __iter__(self):
        for step in range(self.start, self.end):
            base = (step * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)


def _case_name(path: Path) -> str:
    """'case_0000.nii.gz' and 'case.nii.gz' name the same case (nnU-Net's channel suffix)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit() else name


def discover_labelled(source: str | Path) -> tuple[list[tuple[Path, Path]], dict | None]:
    """(image, label) pairs and the label mapping, from an MSD ``dataset.json`` or a folder with
    ``images/`` and ``labels/`` (matched by case name)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        try:
            spec = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("training", []), list):
            raise DataError(f"{source}: a dataset.json must be an object with a 'training' list of "
                            "{\"image\": ..., \"label\": ...} entries and a 'labels' mapping")
        entries = [e for e in spec.get("training", []) if isinstance(e, dict) and "label" in e]
        pairs = [(resolve(source.parent, e["image"]), resolve(source.parent, e["label"])) for e in entries]
        mapping = spec.get("labels")
    elif source.is_dir() and (source / "images").is_dir() and (source / "labels").is_dir():
        labels = {_case_name(p): p for p in (source / "labels").rglob("*") if is_image(p)}
        images = sorted(p for p in (source / "images").rglob("*") if is_image(p))
        unmatched = [p for p in images if _case_name(p) not in labels]
        if unmatched:
            raise DataError(f"{unmatched[0]}: no label map of the same name in {source / 'labels'}")
        pairs, mapping = [(p, labels[_case_name(p)]) for p in images], None
    else:
        raise DataError(f"{source}: expected a dataset.json or a folder with images/ and labels/")
    if not pairs:
        raise DataError(f"{source}: contains no labelled images")
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{source}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    return pairs, mapping


SAMPLINGS = ("balanced", "foreground", "uniform")


class LabelledCrops(Dataset):
    """Sample ``index`` -> (image crop (1, D, H, W), class crop (D, H, W)). Deterministic in (seed, index).

    A share ``foreground_rate`` of the crops is centred on a chosen voxel: ``balanced`` picks a class
    uniformly among those present in the case, then one of its voxels (as MONAI's
    RandCropByLabelClassesd and nnU-Net do), so small structures are seen as often as large ones;
    ``foreground`` picks any foreground voxel, mostly the largest class's. ``uniform`` crops anywhere.
    ``foreground_rate`` None counts the background as one more class, as RandCropByLabelClassesd with
    equal ratios does: n / (n + 1) of the crops for n classes present, the rest random.
    """

    def __init__(self, store: VolumeStore, indices: Sequence[int], crop: Sequence[int], seed: int, length: int,
                 foreground_rate: float | None = None, sampling: str = "balanced"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.store, self.indices, self.crop = store, list(indices), tuple(crop)
        self.seed, self.length, self.foreground_rate, self.sampling = seed, length, foreground_rate, sampling

    def __len__(self) -> int:
        return self.length

    def _centre(self, voxels: list[torch.Tensor], shape: tuple[int, ...], rng: np.random.Generator) -> list | None:
        """A voxel (z, y, x) of the unpadded case to centre the crop on, or None for a random crop."""
        if self.sampling == "uniform":
            return None
        counts = np.array([len(v) for v in voxels])
        present = int(np.count_nonzero(counts))
        rate = present / (present + 1) if self.foreground_rate is None else self.foreground_rate
        if present == 0 or rng.random() >= rate:
            return None
        if self.sampling == "balanced":
            c = int(rng.choice(np.flatnonzero(counts)))
        else:  # foreground: every foreground voxel equally likely
            c = int(rng.choice(len(counts), p=counts / counts.sum()))
        flat = int(voxels[c][int(rng.integers(counts[c]))])
        return list(np.unravel_index(flat, shape))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        item = self.store[self.indices[int(rng.integers(len(self.indices)))]]
        image, label = item["image"], item["label"]
        centre = self._centre(item["class_voxels"], tuple(image.shape), rng)
        both, pad = pad_to(torch.stack([image, label.float()]), self.crop)
        shape = both.shape[1:]
        if centre is not None:
            centre = [c + p // 2 for c, p in zip(centre, pad)]
            start = [min(max(0, c - s // 2), v - s) for c, s, v in zip(centre, self.crop, shape)]
        else:
            start = [int(rng.integers(0, v - s + 1)) for v, s in zip(shape, self.crop)]
        crop = both[(slice(None), *[slice(a, a + s) for a, s in zip(start, self.crop)])]
        return crop[0:1], crop[1].long()
