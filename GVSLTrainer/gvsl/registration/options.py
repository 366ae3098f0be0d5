"""What a registration is asked for and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import SimpleITK as sitk

from ..choices import INITIALISATIONS, MODES, SIMILARITIES
DEFAULT_SPACING = 2.0  # mm: finer working grids cost much more time for little accuracy


class RegistrationError(ValueError):
    pass


DEFORMABLE_LEVELS = ((4, 8, 0.36), (2, 4, 0.36), (1, 4, 0.08))  # see RegistrationOptions.levels


def finest_levels(count: int) -> tuple:
    """The finest ``count`` of the default deformable levels, the coarsest of them given the iterations
    of those left out, so that the finer (costlier) levels keep theirs (``--levels 1``: full resolution
    only; 2: from half resolution; 3: the default)."""
    if not 1 <= count <= len(DEFORMABLE_LEVELS):
        raise RegistrationError(f"levels must be 1 to {len(DEFORMABLE_LEVELS)}, got {count}")
    (image, grid, share), *finer = DEFORMABLE_LEVELS[-count:]
    dropped = sum(s for *_, s in DEFORMABLE_LEVELS[:-count])
    return ((image, grid, round(share + dropped, 4)), *finer)


@dataclass
class RegistrationOptions:
    mode: str = "deformable"  # rigid | affine | deformable (affine, then a velocity field)
    similarity: str = "auto"  # ncc | mind | mi | auto (mind for different modalities, else ncc)
    spacing: float | None = None  # working grid, mm; default: the model's, else the fixed image's median
    #                                spacing but no finer than DEFAULT_SPACING
    max_size: int = 160  # voxels per axis of the working grid at most
    iterations: int = 100  # the budget: each linear level takes half, the deformable levels their shares
    initialisation: str | None = None  # see INITIALISATIONS; None: auto, or none with an initial transform
    rotation_search: bool = True  # try large rotations at the coarsest level; keep one only if it matches better
    normalize: str | tuple[str, str] = "auto"  # ct | mr | auto (each image its own), or (fixed, moving)
    ncc_window: int = 7
    smooth_weight: float = 1.0
    affine_lr: float = 0.01
    deform_lr: float = 0.03
    # deformable levels: (image shrink, velocity-grid shrink, share of the iterations), coarse to fine.
    # 80 % of the budget at a 1.5x rate: on the benchmark's same-modality and CT<->MR pairs (2 seeds
    # each) the same mean end-point error as 100 % at 0.02 (0.715 mm both), 20-45 % less time
    levels: tuple = DEFORMABLE_LEVELS
    # the linear stage runs on images shrunk by these factors, in turn; None: (4, 2), or only 4 before a
    # same-modality deformable stage, which absorbs what the finer affine level would add
    linear_shrinks: tuple | None = None
    # rigid / affine: the full-resolution levels interpolate the moving image from a copy at half the working
    # spacing (see pipeline._pyramid). Not in the deformable mode, where the field absorbs most of the copy's
    # pull: without the copy, same-modality benchmark pairs moved 0.01-0.02 mm (EPE), the cohort benchmark's
    # heads 0.04 mm (Dice 0.856 -> 0.855), partial fields of view -0.04 to +0.05 mm, and the registrations
    # ran 15-30 % faster (cohort heads 5.9 -> 5.1 s)
    finer_moving: bool = True
    polish: bool = True  # rigid / affine with NCC: a last level on the original images (see polish.py)
    tolerance: float = 1e-5  # early stopping: relative loss change over `patience` iterations
    patience: int = 20
    device: str = "auto"

    def linear_levels(self, similarity: str) -> tuple:
        if self.linear_shrinks is not None:
            return tuple(self.linear_shrinks)
        return (4,) if self.mode == "deformable" and similarity == "ncc" else (4, 2)

    def check(self) -> None:
        """Refuse unknown names before any work."""
        from ..volumes import PRESETS

        if self.mode not in MODES:
            raise RegistrationError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.similarity not in SIMILARITIES:
            raise RegistrationError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if self.initialisation is not None and self.initialisation not in INITIALISATIONS:
            raise RegistrationError(f"initialisation must be one of {', '.join(INITIALISATIONS)}, "
                                    f"got {self.initialisation!r}")
        if self.ncc_window < 3 or self.ncc_window % 2 == 0:
            raise RegistrationError(f"the NCC window must be an odd number of voxels, 3 or more, got {self.ncc_window}")
        if not self.smooth_weight >= 0:
            raise RegistrationError(f"the smoothness weight must be 0 or more, got {self.smooth_weight}")
        presets = (self.normalize,) if isinstance(self.normalize, str) else tuple(self.normalize)
        if len(presets) not in (1, 2) or any(p not in PRESETS + ("auto",) for p in presets):
            raise RegistrationError(f"normalize must be auto, ct or mr, or one of them per image, got {self.normalize!r}")


@dataclass
class RegistrationResult:
    affine: sitk.AffineTransform  # fixed -> moving, linear part (the whole result in the linear modes)
    displacement: sitk.Image | None  # LPS mm vectors on the fixed grid, applied before the affine; None: linear
    transform: sitk.Transform  # fixed -> moving: affine(x + d(x)), or the affine alone
    inverse: sitk.Transform  # moving -> fixed
    warped: sitk.Image  # moving on the fixed grid (linear)
    before: sitk.Image  # moving on the fixed grid as the files place it (no registration), for comparison
    jacobian: sitk.Image  # determinant of the fixed -> moving mapping's Jacobian on the fixed grid
    warped_labels: sitk.Image | None
    metrics: dict = field(default_factory=dict)
    working_grid: sitk.Image | None = None
    landmarks: dict | None = None  # {"fixed": (n, 3), "moving": (n, 3), "labels": [...]} LPS mm, for the figure
    outlines: dict | None = None  # {"fixed": labels, "warped": labels} whose outlines the figure draws

    @property
    def figure_jacobian(self) -> sitk.Image | None:
        """The Jacobian the figure shows: none for a linear result, whose Jacobian is one flat value."""
        return None if self.displacement is None else self.jacobian
