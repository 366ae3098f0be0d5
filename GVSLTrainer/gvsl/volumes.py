"""Reading one 3D scalar volume or label map, checked, and mapping its intensities to [0, 1].

Kept free of MONAI and of the training machinery so that registration imports only what it uses.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PRESETS = ("ct", "mr")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # the 3D formats the tools read and write
CT_WINDOW = (-1024.0, 1024.0)
MR_PERCENTILES = (0.5, 99.5)


class DataError(ValueError):
    """A problem with an input file or data source, always naming it."""


NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of the float voxel types a scalar volume uses


def _nifti_layout(path: Path) -> tuple | str | None:
    """(byte order, datatype, data offset, voxels, expected bytes) from a NIfTI header; a problem as a
    string; None for a file this check does not understand (left to the reader)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        return f"cannot be read: its gzip stream is damaged ({e})"
    if len(header) < 348:
        return "cannot be read: its NIfTI header is incomplete"
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            raw_offset = struct.unpack(order + "f", header[108:112])[0]
            if not math.isfinite(raw_offset) or raw_offset < 0:
                return f"has a broken header: its data offset (vox_offset) is {raw_offset}"
            offset = int(raw_offset)
            break
        if size == 540 and len(header) >= 540:  # NIfTI-2
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = max(0, min(int(dims[0]), 7))
    broken = _nifti_geometry_problem(header, order, size, ndim)
    if broken:
        return broken
    voxels = int(np.prod([max(1, d) for d in dims[1:ndim + 1]]))
    offset = max(offset, 352 if size == 348 else 544)
    return order, datatype, offset, voxels, offset + voxels * max(bitpix, 0) // 8


def _nifti_geometry_problem(header: bytes, order: str, size: int, ndim: int) -> str:
    """A NIfTI header whose voxel size or placement is not a number, or zero: ITK reads a voxel size of
    0 or NaN as 1 mm (a result in the wrong place, with only warnings), and a NaN offset as a position
    nowhere (then "does not overlap")."""
    if size == 348:
        pixdim = struct.unpack(order + "8f", header[76:108])
        qform, sform = struct.unpack(order + "2h", header[252:256])
        quatern = struct.unpack(order + "6f", header[256:280])
        srow = struct.unpack(order + "12f", header[280:328])
    else:
        pixdim = struct.unpack(order + "8d", header[104:168])
        qform, sform = struct.unpack(order + "2i", header[344:352])
        quatern = struct.unpack(order + "6d", header[352:400])
        srow = struct.unpack(order + "12d", header[400:496])
    spacing = pixdim[1:max(ndim, 3) + 1][:3]
    if not all(math.isfinite(v) and v != 0 for v in spacing):
        return f"has a broken header: its voxel size (pixdim) is {tuple(spacing)}; a size must be a number above 0"
    if qform > 0 and not all(math.isfinite(v) for v in quatern):
        return f"has a broken header: its qform (quatern_b..qoffset_z) holds {tuple(quatern)}"
    if sform > 0 and not all(math.isfinite(v) for v in srow):
        return "has a broken header: its sform (srow_x, srow_y, srow_z) holds non-numbers"
    return ""


def nifti_size_problem(path: Path) -> str:
    """Why a NIfTI file is cut short ("" when it is whole, or no NIfTI): a .nii must hold the bytes its
    header promises, a .nii.gz's gzip trailer (the uncompressed size, modulo 2^32) must match them.
    Cheap: the header and the last four bytes. What a writer that does not report a full disk leaves."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or not path.is_file():
        return ""
    layout = _nifti_layout(path)
    if layout is None or isinstance(layout, str):
        return layout or ""
    expected = layout[4]
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            stored = struct.unpack("<I", f.read(4))[0]
        if stored != expected % 2 ** 32:
            return (f"is truncated or damaged: its header promises {expected} bytes of data, and its gzip stream "
                    "does not end with that size")
    elif path.stat().st_size < expected:
        return f"is truncated: its header promises {expected} bytes, the file has {path.stat().st_size}"
    return ""


def nifti_problem(path: Path) -> str:
    """Why a NIfTI file cannot be trusted ("" when it can, or is no NIfTI), for what SimpleITK reads
    without complaint: a truncated file or a broken data offset, a .nii.gz whose gzip checksum fails
    (ITK ignores it: a corrupt middle became garbage voxels), and NaN or infinite voxels (read as
    zeros). A .nii.gz is decompressed once to its end, which checks the CRC; float data are counted
    for non-finite values in the same pass."""
    problem = nifti_size_problem(path)
    if problem or not path.name.lower().endswith((".nii", ".nii.gz")) or not path.is_file():
        return problem
    layout = _nifti_layout(path)
    if layout is None or isinstance(layout, str):
        return layout or ""
    order, datatype, offset, voxels, _ = layout
    compressed = path.name.lower().endswith(".gz")
    floats = datatype in NIFTI_FLOATS
    if not compressed and not floats:
        return ""
    dtype = np.dtype(order + NIFTI_FLOATS[datatype]) if floats else None
    bad, chunk = 0, 1 << 22
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            f.seek(offset) if not compressed else f.read(offset)
            done = 0
            while True:
                block = f.read(chunk * (dtype.itemsize if floats else 1))
                if not block:
                    break
                if floats and done < voxels:
                    values = np.frombuffer(block[:(min(len(block) // dtype.itemsize, voxels - done)) * dtype.itemsize],
                                           dtype)
                    done += values.size
                    bad += values.size - int(np.count_nonzero(np.isfinite(values)))
    except (OSError, EOFError, ValueError, zlib.error) as e:
        reason = "its gzip checksum does not match its data" if "CRC" in str(e) else f"its data are damaged ({e})"
        return f"cannot be trusted: {reason}"
    if bad:
        what = "every voxel is" if bad == voxels else f"{bad} of its {voxels} voxels {'is' if bad == 1 else 'are'}"
        return f"{what} NaN or infinite (as stored; SimpleITK would read them as 0)"
    return ""


def metaimage_problem(path: Path) -> str:
    """Why a MetaImage (.mha, or a .mhd with its data file) is cut short ("" when whole or not one): the
    header says how many bytes the data take (MetaImage itself prints two lines, then a misleading
    "No such file or directory")."""
    name = path.name.lower()
    if not name.endswith((".mha", ".mhd")) or not path.is_file():
        return ""
    fields, header_bytes = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            header_bytes += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile" or header_bytes > 100_000:
                break
    sizes = {"met_uchar": 1, "met_char": 1, "met_ushort": 2, "met_short": 2, "met_uint": 4, "met_int": 4,
             "met_float": 4, "met_double": 8, "met_ulong": 8, "met_long": 8, "met_ulong_long": 8, "met_long_long": 8}
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        item = sizes[fields["elementtype"].lower()] * int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        return ""  # a header this check does not understand: left to the reader
    source = fields.get("elementdatafile", "")
    data = path if source.upper() == "LOCAL" else path.parent / source
    if not data.is_file():
        return f"names a data file {source!r} that does not exist" if source and "%" not in source else ""
    if fields.get("compresseddata", "false").lower() == "true":
        expected = int(fields.get("compresseddatasize", "0") or 0)
    else:
        expected = int(np.prod(dims)) * item
    have = data.stat().st_size - (header_bytes if data == path else 0)
    if expected and have < expected:
        return f"is truncated: its header promises {expected} bytes of data, the file has {max(have, 0)}"
    return ""


def _geometry_problem(image: sitk.Image) -> str:
    """A grid ITK read but the tools cannot place: a voxel size that is not above 0, a position that is
    not a number, or axes that are not perpendicular (resampling would shear the image: a fixed image
    whose axes were 3 degrees off gave a result 3 degrees off its grid)."""
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return f"has a broken voxel size {tuple(spacing)}; a size must be a number above 0"
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()):
        return "has a position or orientation that is not a number (NaN or infinite)"
    skew = np.abs(direction.T @ direction - np.eye(3)).max()
    if skew > 1e-4:
        angle = np.degrees(np.arcsin(min(1.0, skew)))
        return (f"has axes that are not perpendicular (its direction matrix is off by about {angle:.2g} degrees): "
                "resample it onto a grid with perpendicular axes first")
    return ""


def _read_3d_scalar(path: Path, what: str) -> sitk.Image:
    from . import stderr

    problem = nifti_problem(path) or metaimage_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with stderr.held():  # ITK's and MetaImage's own lines give way to the error below
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise DataError(f"{path}: cannot be read as {what} ({first})") from None
    problem = _geometry_problem(image) if image.GetDimension() == 3 else ""
    if problem:
        raise DataError(f"{path}: {problem}")
    dim = image.GetDimension()
    if dim != 3:
        raise DataError(f"{path}: is a {dim}D image of size {image.GetSize()}; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                        "a scalar (single-channel) volume is needed")
    return image


MIN_SIZE = 8  # voxels per axis (after resampling to the working spacing); fewer carry no usable anatomy


def read_volume(path: str | Path) -> sitk.Image:
    """Read one 3D scalar volume, or raise a DataError saying what is wrong with the file."""
    path = Path(path)
    image = _read_3d_scalar(path, "an image")
    if min(image.GetSize()) < 2:
        raise DataError(f"{path}: has size {image.GetSize()}; a 3D volume needs at least 2 voxels per axis")
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains {int((~np.isfinite(array)).sum())} NaN or infinite voxels")
    if array.min() == array.max():
        raise DataError(f"{path}: is constant (every voxel is {array.min()}); there is nothing to learn from it")
    return image


def read_mask(path: str | Path) -> sitk.Image:
    """Read a 3D mask: any finite values, non-zero meaning use (a probability map's 0.7 or a -1 count
    as inside), as a uint8 image of 0 and 1, naming the file on any problem."""
    path = Path(path)
    image = _read_3d_scalar(path, "a mask")
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise DataError(f"{path}: a mask needs finite values (non-zero means use)")
    return sitk.Cast(image != 0, sitk.sitkUInt8)


def read_labels(path: str | Path) -> sitk.Image:
    """Read a 3D label map (integer values, also when stored as floats), naming the file on any problem."""
    path = Path(path)
    image = _read_3d_scalar(path, "a label map")
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all() or array.min() < 0:
        raise DataError(f"{path}: a label map needs finite, non-negative values")
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkInt16, sitk.sitkInt32):
        fractional = array != np.rint(array)
        if fractional.any():  # rounding would merge classes silently
            raise DataError(f"{path}: a label map needs integer values; {int(fractional.sum())} voxels are not "
                            f"(e.g. {float(array[fractional][0]):g})")
        rounded = sitk.GetImageFromArray(np.rint(array).astype(np.uint32))
        rounded.CopyInformation(image)
        image = rounded
    return image


def normalise(array: np.ndarray, preset: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensities to [0, 1]: ``ct`` clips Hounsfield units to [-1024, 1024]; ``mr`` clips percentiles
    (of the voxels inside ``mask`` when one is given, so that an excluded artefact does not set them)."""
    array = array.astype(np.float32, copy=False)
    if preset == "ct":
        lo, hi = CT_WINDOW
    elif preset == "mr":
        inside = array if mask is None or not mask.any() else array[mask]
        lo, hi = (float(v) for v in np.percentile(inside, MR_PERCENTILES))
        if hi <= lo:
            lo, hi = float(array.min()), float(array.max())
    else:
        raise ValueError(f"normalisation preset must be one of {PRESETS}, got {preset!r}")
    if hi <= lo:  # a constant image (e.g. a region the other image does not reach): no contrast at all
        return np.zeros_like(array, dtype=np.float32)
    return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def auto_preset(image: sitk.Image) -> str:
    """``ct`` when the image holds Hounsfield units (air near -1000), else ``mr``."""
    return "ct" if float(np.percentile(sitk.GetArrayViewFromImage(image), 1)) < -500 else "mr"
