"""Figures a person can judge at a glance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _slices(array: np.ndarray) -> list[np.ndarray]:
    """Mid-slices along the three array axes: axial-like (k), coronal-like (j), sagittal-like (i)."""
    d, h, w = array.shape
    return [array[d // 2], array[:, h // 2][::-1], array[:, :, w // 2][::-1]]


def _displayed_slices(image: sitk.Image) -> list[np.ndarray]:
    """``_slices`` in [0, 1] through the volume's 1-99 % intensity window: only the slices are scaled
    (scaling a 1 mm head's 7 M voxels for three slices took a third of a second)."""
    array = sitk.GetArrayViewFromImage(image)  # ``image`` is the caller's: the view outlives nothing
    lo, hi = np.percentile(array, [1, 99]).astype(np.float32)
    span = max(hi - lo, np.float32(1e-6))
    return [np.clip((x.astype(np.float32) - lo) / span, 0, 1) for x in _slices(array)]


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    yy, xx = np.indices(a.shape)
    size = max(1, max(a.shape) // tiles)
    return np.where(((yy // size) + (xx // size)) % 2 == 0, a, b)


DPI = 80
PANELS = ("fixed", "moving (before)", "warped (after)", "checkerboard before", "checkerboard after",
          "Jacobian determinant")  # the figure's columns; the last is coloured by its own scale


def empty_figure(titles: tuple[str, ...] = PANELS):
    """The figure's titled axes without their images, and the Jacobian's colour bar (a fixed 0-2 scale):
    most of the drawing time, so that ``gvsl.report_process`` builds it while the registration runs."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state to close

    fig = Figure(figsize=(3 * len(titles), 9.5), dpi=DPI)
    axes = fig.subplots(3, len(titles))
    for col, title in enumerate(titles):
        axes[0, col].set_title(title, fontsize=10)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
        if title.startswith("Jacobian"):
            fig.colorbar(ScalarMappable(Normalize(0, 2), "RdBu_r"), ax=axes[:, col], shrink=0.6,
                         label="det J (<= 0: folding)")
    return fig, axes


def registration_panels(fixed: sitk.Image, before: sitk.Image, warped: sitk.Image, jacobian: sitk.Image,
                        landmarks: dict | None = None) -> dict:
    """What the figure shows, as plain arrays: mid-slices of fixed, moving and warped, checkerboards
    before and after, the Jacobian determinant, and the landmarks projected onto each view.

    Plain arrays, so that another process can draw them (``gvsl.report_process``) without the volumes.
    """
    f, b, w = (_displayed_slices(x) for x in (fixed, before, warped))
    jac = [x.astype(np.float32) for x in _slices(sitk.GetArrayViewFromImage(jacobian))]
    panels = dict(zip(PANELS, (f, b, w, [_checkerboard(x, y) for x, y in zip(f, b)],
                               [_checkerboard(x, y) for x, y in zip(f, w)], jac)))
    points = None
    if landmarks is not None:
        points = {key: _projected(fixed, np.asarray(landmarks[key])) for key in ("fixed", "moving")}
    return {"panels": {k: [np.ascontiguousarray(x) for x in v] for k, v in panels.items()},
            "aspects": _aspects(fixed), "landmarks": points}


def draw_panels(figure: dict, layout=None):
    """The figure of ``registration_panels``, without its title: fixed landmarks as + (then as circles
    around where they should land), moving landmarks as x. ``layout``: an unused ``empty_figure()`` to
    draw into, used when the figure has its columns (``PANELS``)."""
    titles = tuple(figure["panels"])
    fig, axes = layout if layout is not None and titles == PANELS else empty_figure(titles)
    for col, (title, images) in enumerate(figure["panels"].items()):
        jacobian = title.startswith("Jacobian")
        for row, image in enumerate(images):
            axes[row, col].imshow(image, cmap="RdBu_r" if jacobian else "gray", aspect=figure["aspects"][row],
                                  interpolation="nearest", vmin=0, vmax=2 if jacobian else 1)
        if figure["landmarks"] is not None and title in ("fixed", "warped (after)"):
            _draw_landmarks(axes[:, col], figure["landmarks"], moving=title != "fixed")
    return fig


def draw_registration(figure: dict, path: str | Path, metrics: dict | None = None) -> Path:
    """Draw ``registration_panels`` into a PNG, titled with the metrics' summary."""
    fig = draw_panels(figure)
    if metrics:
        fig.suptitle(_summary(metrics), fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def render(fig) -> None:
    """Render ``draw_panels``'s figure now, so that ``save_rendered`` has only the title left to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()


def save_rendered(fig, path: str | Path, metrics: dict | None = None) -> Path:
    """The PNG of a ``render``-ed figure, its title drawn onto the rendered pixels (where nothing else
    is): the same image as ``draw_registration``'s."""
    from matplotlib.image import imsave

    if metrics:
        fig.draw_artist(fig.suptitle(_summary(metrics), fontsize=10))
    path = Path(path)
    imsave(path, np.asarray(fig.canvas.buffer_rgba()), format="png", dpi=DPI)
    return path


def registration_report(fixed: sitk.Image, before: sitk.Image, warped: sitk.Image, jacobian: sitk.Image,
                        path: str | Path, metrics: dict | None = None, landmarks: dict | None = None) -> Path:
    """The registration figure in this process. ``landmarks``: {"fixed": (n, 3), "moving": (n, 3)
    mapped into fixed space, LPS mm}."""
    return draw_registration(registration_panels(fixed, before, warped, jacobian, landmarks), path, metrics)


def _projected(fixed: sitk.Image, points: np.ndarray) -> list[np.ndarray]:
    """(x, y) of LPS points on each of the three mid-slice views of ``fixed`` (as ``_slices`` lays them out)."""
    d = fixed.GetSize()[2]
    i, j, k = np.array([fixed.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points]).reshape(-1, 3).T
    return [np.stack(xy) for xy in ((i, j), (i, d - 1 - k), (j, d - 1 - k))]


def _draw_landmarks(axes, points: dict, moving: bool) -> None:
    styles = [("fixed", dict(marker="o", facecolors="none", edgecolors="lime", s=60) if moving else
               dict(marker="+", c="lime", s=30))]
    if moving:  # a moving landmark inside its fixed circle: registered there
        styles.append(("moving", dict(marker="x", c="red", s=30)))
    for key, style in styles:
        for ax, (x, y) in zip(axes, points[key]):
            ax.set_autoscale_on(False)  # points off the slice's extent do not widen the view
            ax.scatter(x, y, linewidths=1.2, **style)


def _aspects(image: sitk.Image) -> list[float]:
    sx, sy, sz = image.GetSpacing()
    return [sy / sx, sz / sx, sz / sy]


def _summary(m: dict) -> str:
    share = m.get("similarity", {}).get("share_of_self") if m.get("similarity", {}).get("name") == "ncc" else None
    parts = [f"local NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}"
             + (f" ({share:.0%} of the fixed image's own)" if share is not None else ""),
             f"folding {m['folding_percent']:.3f}%",
             f"inverse consistency {m['inverse_consistency_mm']['mean']:.2f} mm",
             f"{m.get('runtime_s', 0):.1f} s on {m.get('device', '?')}"]
    if "similarity" in m and m["similarity"]["name"] != "ncc":
        parts.insert(0, f"{m['similarity']['name']} {m['similarity']['before']:.3f} -> {m['similarity']['after']:.3f}")
    if "dice_after" in m:
        after = [v for v in m["dice_after"].values() if v is not None]
        before = [v for v in m["dice_before"].values() if v is not None]
        if after and before:
            parts.insert(1, f"mean Dice {np.mean(before):.3f} -> {np.mean(after):.3f}")
    if "tre_after" in m:
        parts.insert(1, f"TRE {m['tre_before']['mean_mm']:.2f} -> {m['tre_after']['mean_mm']:.2f} mm")
    text = "   ".join(parts)
    if m.get("warnings"):
        text += "\nWARNING: " + "; ".join(w["code"].replace("_", " ") for w in m["warnings"]) + " (see metrics.json)"
    return text
