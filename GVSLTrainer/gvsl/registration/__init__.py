"""Registration of two volumes in physical space: rigid, affine or deformable, for any pair of modalities.

One job per module: ``pipeline`` (inputs, start, stages, physical transforms), ``linear`` (rotation
search, rigid and affine refinement), ``deformable`` (velocity field), ``pyramid`` (the pair at
several resolutions), ``quality`` (the figures), ``landmarks`` (landmark files and target
registration error), ``optim`` (Adam and early stopping), ``options`` (what is asked and returned).
"""
from .landmarks import LandmarkError, Landmarks, read_landmarks
from .options import (DEFAULT_SPACING, INITIALISATIONS, MODES, RegistrationError, RegistrationOptions,
                      RegistrationResult)
from .pipeline import initial_alignment, linear_matrix, mask_problem, register

__all__ = ["DEFAULT_SPACING", "INITIALISATIONS", "MODES", "LandmarkError", "Landmarks", "RegistrationError",
           "RegistrationOptions", "RegistrationResult", "initial_alignment", "linear_matrix", "mask_problem",
           "read_landmarks", "register"]
