"""Python packages the GVSL module needs inside Slicer, installed only with the user's consent,
asked once for all of them.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build for the
machine's GPU; the rest comes from pip. Packages Slicer ships are never installed or upgraded.
Nothing here imports torch: the module's work runs in a child process.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
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
    importlib.invalidate_caches()  # see what an install just now added
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


def installPlan() -> tuple[str | None, list[str]]:
    """What is missing: the PyTorch action ("install", "upgrade" or None) and the pip requirements."""
    missing = missingPackages()
    torch = "install" if "torch" in missing else "upgrade" if torchTooOld() else None
    return torch, pipRequirements(missing)


def confirmationText(torch: str | None, requirements: list[str]) -> str:
    """One question for everything an install needs, as the user will answer it once."""
    lines = ["GVSL needs Python packages that are not installed yet:", ""]
    if torch:
        lines.append(f"- PyTorch {'>=' + '.'.join(map(str, MIN_TORCH))} ({torch}, through the PyTorch extension, "
                     "which picks the build for this computer's GPU)")
    lines += [f"- {r}" for r in requirements]
    return "\n".join(lines + ["", "Install them now? This can take several minutes."])


def ensureDependencies(confirm: Callable[[str], bool], restart: Callable[[str], None]) -> bool:
    """Install what is missing after one confirmation; False when the user declined, an install failed
    or Slicer must restart first (``restart`` is told why: a PyTorch already loaded in this process
    cannot be replaced, its files are in use)."""
    torch, requirements = installPlan()
    if not torch and not requirements:
        return True
    if torch == "upgrade" and "torch" in sys.modules:
        restart(f"GVSL needs PyTorch >= {'.'.join(map(str, MIN_TORCH))}, and PyTorch "
                f"{importlib.metadata.version('torch')} is already loaded in Slicer, so it cannot be replaced now. "
                "Restart Slicer, then click again to upgrade it.")
        return False
    if torch:
        try:
            import PyTorchUtils  # the PyTorch extension, declared in the extension's DEPENDS
        except ImportError:
            raise RuntimeError("PyTorch is not installed and the PyTorch extension is missing: install "
                               "'PyTorch' from the Extensions Manager, restart Slicer and try again") from None
    if not confirm(confirmationText(torch, requirements)):
        return False
    if torch:
        requirement = ">=" + ".".join(map(str, MIN_TORCH))
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=requirement) is None:
            return False
    if requirements:
        import slicer

        with tempfile.TemporaryDirectory() as tmp:
            slicer.util.pip_install(pipArguments(requirements, Path(tmp) / "slicer-pins.txt"))
    return installPlan() == (None, [])
