"""Shared fixtures: small real anatomy from installed packages, and deliberately broken files."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.demo import package_file


@pytest.fixture(scope="session")
def anatomical_path() -> Path:
    """A real T1 head, 33x41x25 at 2 mm, shipped in nibabel's test data."""
    return package_file("nibabel", "tests/data/anatomical.nii")


@pytest.fixture(scope="session")
def mni_path() -> Path:
    return package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def untrained_segmentation_model(path: Path, spacing: float = 2.0) -> Path:
    """A width-4 segmentation checkpoint of two classes (background, head), untrained (seed 0): what
    segment.py and its callers need, for tests of everything around the network."""
    import torch

    from gvsl import checkpoint
    from gvsl.labels import LabelSpec
    from gvsl.networks import GVSLSegmenter

    torch.manual_seed(0)
    spec = LabelSpec([0, 1], ["background", "head"], [(0, 0, 0), (0.9, 0.6, 0.2)])
    return checkpoint.save(path, GVSLSegmenter(2, width=4), "segmentation", {
        "width": 4, "in_channels": 1, "labels": spec.as_dict(), "normalize": "mr", "spacing": [spacing] * 3,
        "crop": [16, 16, 16]})


@pytest.fixture
def small_folder(tmp_path, anatomical_path) -> Path:
    """Two real volumes in a nested folder, one of them re-oriented and re-gridded."""
    img = sitk.ReadImage(str(anatomical_path))
    write(img, tmp_path / "data" / "a" / "head1.nii.gz")
    flipped = sitk.Flip(img, [True, False, False])
    flipped.SetSpacing((2.0, 2.2, 1.8))
    write(flipped, tmp_path / "data" / "b" / "head2.nrrd")
    return tmp_path / "data"


@pytest.fixture
def bad_files(tmp_path) -> dict:
    """One broken file per kind of bad input."""
    out = {}
    corrupt = tmp_path / "bad" / "corrupt.nii.gz"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x1f\x8b this is not really a gzipped NIfTI file" * 10)
    out["corrupt"] = corrupt
    out["2d"] = write(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), tmp_path / "bad" / "slice.nii.gz")
    frames = [sitk.GetImageFromArray(np.random.rand(16, 16, 16).astype(np.float32)) for _ in range(3)]
    out["4d"] = write(sitk.JoinSeries(frames), tmp_path / "bad" / "series.nii.gz")
    nan = np.random.rand(16, 16, 16).astype(np.float32)
    nan[3, 4, 5] = np.nan
    out["nan"] = write(sitk.GetImageFromArray(nan), tmp_path / "bad" / "nan.nrrd")
    out["constant"] = write(sitk.GetImageFromArray(np.full((16, 16, 16), 7, np.int16)), tmp_path / "bad" / "constant.mha")
    out["tiny"] = write(sitk.GetImageFromArray(np.random.rand(4, 5, 6).astype(np.float32)), tmp_path / "bad" / "tiny.nii.gz")
    out["vector"] = write(sitk.GetImageFromArray(np.random.rand(16, 16, 16, 3).astype(np.float32), isVector=True),
                          tmp_path / "bad" / "rgb.nrrd")
    return out
