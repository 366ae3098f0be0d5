"""Finding, checking and preprocessing volumes; every bad input gets an error naming the file."""
import json
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import data, geometry
from gvsl.data import DataError, Preprocessing


def test_discover_folder_list_and_dataset_json(tmp_path, small_folder):
    found = data.discover(small_folder)
    assert [p.name for p in found] == ["head1.nii.gz", "head2.nrrd"]
    listing = tmp_path / "list.txt"
    listing.write_text("# my scans\ndata/a/head1.nii.gz\n\n" + str(found[1]) + "\n")
    assert data.discover(listing) == [tmp_path / "data/a/head1.nii.gz", found[1]]
    spec = {"name": "x", "training": [{"image": "./data/a/head1.nii.gz", "label": "l.nii.gz"}],
            "test": ["data/b/head2.nrrd"]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    assert [p.name for p in data.discover(tmp_path / "dataset.json")] == ["head1.nii.gz", "head2.nrrd"]


def test_discover_errors_name_the_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*contains no images"):
        data.discover(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere.*no such file"):
        data.discover(tmp_path / "nowhere")
    listing = tmp_path / "list.txt"
    listing.write_text("missing.nii.gz\n")
    with pytest.raises(DataError, match="missing.nii.gz"):
        data.discover(listing)
    bad_json = tmp_path / "dataset.json"
    bad_json.write_text("{not json")
    with pytest.raises(DataError, match="dataset.json.*not valid JSON"):
        data.discover(bad_json)


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "cannot be read"), ("2d", "2D image"), ("4d", "4D image"), ("nan", "1 NaN or infinite"),
    ("constant", "is constant"), ("vector", "3 components"),
])
def test_bad_volumes_get_clear_errors(bad_files, kind, message):
    path = bad_files[kind]
    with pytest.raises(DataError) as err:
        data.read_volume(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_tiny_volume_is_rejected_after_resampling(bad_files):
    with pytest.raises(DataError, match=r"tiny.nii.gz: is only 6x5x4 voxels"):
        Preprocessing((1.0, 1.0, 1.0), "mr")(bad_files["tiny"])


def test_normalisation_presets():
    hu = np.array([-3000, -1024, 0, 1024, 3000], np.float32)
    np.testing.assert_allclose(data.normalise(hu, "ct"), [0, 0, 0.5, 1, 1])
    mr = np.arange(1001, dtype=np.float32)
    out = data.normalise(mr, "mr")
    assert out.min() == 0 and out.max() == 1
    assert out[500] == pytest.approx(0.5, abs=1e-3)
    assert out[3] == 0 and out[998] == 1  # beyond the 0.5 / 99.5 percentiles
    with pytest.raises(ValueError, match="preset"):
        data.normalise(mr, "pet")


def oblique_image():
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.random((12, 20, 30)).astype(np.float32))
    img.SetSpacing((0.9, 1.3, 2.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    rot = sitk.VersorTransform((0.3, -0.2, 0.9), 0.35).GetMatrix()
    # axes that point roughly to R, A, I: the canonical form must flip them back
    d = np.array(rot).reshape(3, 3) @ np.diag([-1, -1, -1])
    img.SetDirection(d.flatten().tolist())
    return img


def test_canonical_keeps_physical_positions_and_orients_axes():
    img = oblique_image()
    can = geometry.canonical(img, None)
    d = np.array(can.GetDirection()).reshape(3, 3)
    assert (np.diag(d) > 0).all()  # axes now point to L, P, S
    # same physical point, same value: reorientation only permutes and flips
    for idx in [(0, 0, 0), (29, 19, 11), (5, 7, 3)]:
        p = img.TransformIndexToPhysicalPoint(idx)
        assert can[can.TransformPhysicalPointToIndex(p)] == pytest.approx(img[idx])


def test_canonical_resampling_keeps_the_extent_and_values():
    img = sitk.SmoothingRecursiveGaussian(oblique_image(), 3.0)
    res = geometry.canonical(img, 1.5)
    assert res.GetSpacing() == (1.5, 1.5, 1.5)
    extent_in = np.array(img.GetSize()) * np.array(img.GetSpacing())
    extent_out = np.array(res.GetSize()) * np.array(res.GetSpacing())
    np.testing.assert_allclose(sorted(extent_out), sorted(extent_in), atol=1.5)
    # a physical point inside keeps its (interpolated) value
    p = img.TransformContinuousIndexToPhysicalPoint((15.0, 10.0, 6.0))
    interp_in = img.EvaluateAtPhysicalPoint(p, sitk.sitkLinear)
    interp_out = res.EvaluateAtPhysicalPoint(p, sitk.sitkLinear)
    assert interp_out == pytest.approx(interp_in, abs=0.02)


def test_store_caches_decoded_volumes_and_skips_bad_files(tmp_path, small_folder, bad_files, monkeypatch):
    calls = []
    real = data.read_volume
    monkeypatch.setattr(data, "read_volume", lambda p: calls.append(p) or real(p))
    paths = data.discover(small_folder) + [bad_files["corrupt"], bad_files["nan"]]
    prep = Preprocessing((2.0, 2.0, 2.0), "mr")
    with pytest.warns(UserWarning, match="corrupt.nii.gz"):
        store = data.VolumeStore(paths, prep, tmp_path / "cache", progress=False)
    assert len(store) == 2 and set(store.skipped) == {bad_files["corrupt"], bad_files["nan"]}
    vol = store[0]
    assert vol.dtype == torch.float32 and vol.min() >= 0 and vol.max() <= 1 and vol.ndim == 3
    decoded = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = data.VolumeStore(paths, prep, tmp_path / "cache", progress=False)
    for i in range(len(again)):
        again[i]
    assert len(calls) == decoded + 2  # only the two bad files are tried again; good ones come from the cache
    torch.testing.assert_close(again[0], vol)


def test_store_with_only_bad_files_fails_clearly(tmp_path, bad_files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="none of the 2 images could be used.*2D image"):
            data.VolumeStore([bad_files["2d"], bad_files["constant"]], Preprocessing(), tmp_path / "c", progress=False)


def test_crop_pads_small_volumes():
    vol = torch.ones(10, 40, 20)
    crop = data.crop_at(vol, (16, 16, 16), (0.3, 0.999, 0.0))
    assert crop.shape == (16, 16, 16)
    assert crop[:3].sum() == 0 and crop[13:].sum() == 0 and crop[3:13].min() == 1  # padded, centred
    ramp = torch.arange(40.0)[None, :, None].expand(10, 40, 20)
    assert data.crop_at(ramp, (16, 16, 16), (0, 0.999, 0))[5, :, 5].tolist() == list(range(24, 40))  # the last start
    assert data.crop_at(ramp, (16, 16, 16), (0, 0.0, 0))[0, 0, 0] == 0


def test_pairs_are_deterministic_per_index(tmp_path, small_folder):
    store = data.VolumeStore(data.discover(small_folder), Preprocessing((2.0,) * 3, "mr"), tmp_path / "c", False)
    pairs = data.PairCrops(store, (16, 16, 16), seed=3, length=100)
    a, b = pairs[7], pairs[7]
    assert a[0].shape == (1, 16, 16, 16)
    torch.testing.assert_close(a, b)
    assert not torch.equal(pairs[8][0], a[0])


def test_pair_crops_show_corresponding_anatomy():
    """Two volumes of one region, the second with a larger field of view: both crops come from the same
    relative position. Filled with the relative coordinate along one axis, the two crops' means (their
    centres' relative places) agree; crops drawn independently differ by up to 0.62."""
    for axis in range(3):
        def ramp(shape):
            return torch.linspace(0, 1, shape[axis]).reshape([-1 if d == axis else 1 for d in range(3)]).expand(shape)

        pairs = data.PairCrops([ramp((40, 50, 60)), ramp((60, 50, 80))], (16, 16, 16), seed=axis, length=300)
        gaps = [abs(float(f.mean() - m.mean())) for f, m in (pairs[i] for i in range(300))]
        assert max(gaps) < 0.1, (axis, max(gaps))  # fields of view 40 and 60: 0.065 + a voxel's rounding
        assert len({round(float(pairs[i][0].mean()), 3) for i in range(300)}) > 20  # positions do vary


def test_step_sampler_partitions_steps_across_ranks():
    r0 = list(data.StepSampler(2, 4, batch_size=3, rank=0, world_size=2))
    r1 = list(data.StepSampler(2, 4, batch_size=3, rank=1, world_size=2))
    assert r0 == [12, 13, 14, 18, 19, 20] and r1 == [15, 16, 17, 21, 22, 23]
