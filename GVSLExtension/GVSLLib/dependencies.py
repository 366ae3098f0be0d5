"""Python packages the GVSL module needs inside Slicer, installed only with the user's consent.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build for the
machine's GPU; the rest comes from pip. Packages Slicer ships are never installed or upgraded.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from pathlib import Path
from typing import Callable

SHIPPED_WITH_SLICER = frozenset({"numpy", "SimpleITK", "vtk"})
# held at their installed versions whenever pip runs: Slicer's own packages, and torch, which
# PyTorchUtils installed for the machine's GPU (MONAI 1.6 requires torch>=2.8, and pip would
# otherwise swap a CUDA build for a CPU-only wheel from PyPI)
HELD = SHIPPED_WITH_SLICER | {"torch"}
MIN_TORCH = (2, 1)
# import name -> pip requirement; torch is handled by PyTorchUtils
PIP_PACKAGES = {"monai": "monai>=1.3", "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib"}


def missingPackages() -> list[str]:
    """Import names of what is not importable yet (torch first)."""
    names = ["torch", *PIP_PACKAGES]
    return [n for n in names if importlib.util.find_spec(n) is None]


def pipRequirements(missing: list[str]) -> list[str]:
    """pip requirements for the missing packages, never one that Slicer ships."""
    return [PIP_PACKAGES[n] for n in missing if n in PIP_PACKAGES and n not in SHIPPED_WITH_SLICER]


def heldPins() -> list[str]:
    """pip constraints that hold Slicer's packages and torch at their installed versions, so that no
    dependency of ours (MONAI needs numpy and torch, say) replaces them: pip never chooses torch."""
    pins = []
    for name in sorted(HELD, key=str.lower):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # built into Slicer rather than pip-installed (VTK): pip cannot touch it anyway
    return pins


def pipArguments(requirements: list[str], constraints: Path) -> list[str]:
    constraints.write_text("\n".join(heldPins()) + "\n")
    return [*requirements, "--constraint", str(constraints)]


def torchTooOld(version: str | None = None) -> bool:
    """Whether the installed torch (read from its metadata: no import on Slicer's GUI thread) is older
    than MIN_TORCH."""
    try:
        version = version or importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers) < MIN_TORCH


def ensureDependencies(confirm: Callable[[str], bool]) -> bool:
    """Install what is missing after asking; False when the user declined or an install failed."""
    missing = missingPackages()
    if "torch" in missing or torchTooOld():
        try:
            import PyTorchUtils  # the PyTorch extension, declared in the extension's DEPENDS
        except ImportError:
            raise RuntimeError("PyTorch is not installed and the PyTorch extension is missing: install "
                               "'PyTorch' from the Extensions Manager, restart Slicer and try again") from None
        requirement = ">=" + ".".join(map(str, MIN_TORCH))  # PyTorchUtils offers the install or the upgrade
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                         torchVersionRequirement=requirement) is None:
            return False
    requirements = pipRequirements(missing)
    if requirements:
        if not confirm("GVSL needs these Python packages, which are not installed yet:\n\n"
                       + "\n".join(requirements) + "\n\nInstall them now? (This can take a few minutes.)"):
            return False
        import slicer

        with tempfile.TemporaryDirectory() as tmp:
            slicer.util.pip_install(pipArguments(requirements, Path(tmp) / "slicer-pins.txt"))
    return not missingPackages()
