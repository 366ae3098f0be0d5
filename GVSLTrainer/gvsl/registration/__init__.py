"""Registration of two volumes in physical space: rigid, affine or deformable, for any pair of modalities.

One job per module: ``preparation`` (inputs checked, the start, the working grid; no torch),
``pipeline`` (the stages, physical transforms, figures), ``linear`` (rotation
search, rigid and affine refinement), ``deformable`` (velocity field), ``pyramid`` (the pair at
several resolutions), ``quality`` (the figures), ``landmarks`` (landmark files and target
registration error), ``optim`` (Adam and early stopping), ``options`` (what is asked and returned).
"""
from .landmarks import LandmarkError, Landmarks, read_landmarks
from .options import (DEFAULT_SPACING, INITIALISATIONS, MODES, RegistrationError, RegistrationOptions,
                      RegistrationResult)
from .preparation import Prepared, initial_alignment, linear_matrix, mask_problem, prepare

__all__ = ["DEFAULT_SPACING", "INITIALISATIONS", "MODES", "LandmarkError", "Landmarks", "Prepared",
           "RegistrationError", "RegistrationOptions", "RegistrationResult", "initial_alignment", "linear_matrix",
           "mask_problem", "prepare", "read_landmarks", "register", "register_prepared"]


def __getattr__(name: str):
    """``register`` and ``register_prepared`` import torch when first asked for, not with the package:
    a command line reads and prepares its inputs while torch loads (see ``preparation``)."""
    if name in ("register", "register_prepared"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
