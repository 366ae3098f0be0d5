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


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The fixed image in magenta and the moving one in green: grey where they agree, coloured fringes
    where they do not. Readable also when the two images are alike, which a checkerboard is not."""
    return np.stack([fixed, moving, fixed], axis=-1)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Where a label map's slice changes value (its outlines), as a boolean mask."""
    edge = np.zeros(labels.shape, bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge


DPI = 80
PANELS = ("fixed", "moving (before)", "warped (after)", "overlay before", "overlay after",
          "Jacobian determinant")  # the figure's columns; the last is coloured by its own scale
LINEAR_PANELS = PANELS[:-1] + ("difference after",)  # a linear map's Jacobian is one flat value
OUTLINE_COLOURS = {"fixed": (0.2, 1.0, 0.2), "warped": (1.0, 0.25, 0.25)}  # label outlines: lime, red
OVERLAY_NOTE = "overlays: fixed magenta, moving green, grey where they agree"


def empty_figure(titles: tuple[str, ...] = PANELS):
    """The figure's titled axes without their images, and the Jacobian's colour bar (a fixed 0-2 scale):
    most of the drawing time, so that ``gvsl.report_process`` builds it while the registration runs."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state to close

    fig = Figure(figsize=(3 * len(titles), 9.5), dpi=DPI)
    axes = fig.subplots(3, len(titles))
    fig.subplots_adjust(bottom=0.07)  # room for the legend
    for col, title in enumerate(titles):
        axes[0, col].set_title(title, fontsize=10)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
        if title.startswith("Jacobian"):
            fig.colorbar(ScalarMappable(Normalize(0, 2), "RdBu_r"), ax=axes[:, col], shrink=0.6,
                         label="det J (<= 0: folding)")
    return fig, axes


def registration_panels(fixed: sitk.Image, before: sitk.Image, warped: sitk.Image, jacobian: sitk.Image | None,
                        landmarks: dict | None = None, outlines: dict | None = None) -> dict:
    """What the figure shows, as plain arrays: mid-slices of fixed, moving and warped, colour overlays
    before and after, the Jacobian determinant (None for a linear result: the difference after instead),
    the landmarks projected onto each view, and label maps' outlines (``outlines``: {"fixed": labels on
    the fixed grid, "warped": the moving labels warped}, either may be absent).

    Plain arrays, so that another process can draw them (``gvsl.report_process``) without the volumes.
    """
    f, b, w = (_displayed_slices(x) for x in (fixed, before, warped))
    if jacobian is None:
        last = [np.abs(x - y) for x, y in zip(f, w)]
    else:
        last = [x.astype(np.float32) for x in _slices(sitk.GetArrayViewFromImage(jacobian))]
    titles = PANELS if jacobian is not None else LINEAR_PANELS
    panels = dict(zip(titles, (f, b, w, [_overlay(x, y) for x, y in zip(f, b)],
                               [_overlay(x, y) for x, y in zip(f, w)], last)))
    points = None
    if landmarks is not None:
        points = {key: _projected(fixed, np.asarray(landmarks[key])) for key in ("fixed", "moving")}
    edges = {key: [_edges(x) for x in _slices(sitk.GetArrayFromImage(
        sitk.Resample(labels, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)))]  # on the fixed grid
        for key, labels in (outlines or {}).items() if labels is not None}
    return {"panels": {k: [np.ascontiguousarray(x) for x in v] for k, v in panels.items()},
            "aspects": _aspects(fixed), "landmarks": points, "outlines": edges}


def draw_panels(figure: dict, layout=None):
    """The figure of ``registration_panels``, without its title: fixed landmarks as + (then as circles
    around where they should land), moving landmarks as x, label outlines over the fixed, warped and
    overlay-after views, and a legend for what is drawn. ``layout``: an unused ``empty_figure()`` to
    draw into, used when the figure has its columns (``PANELS``)."""
    titles = tuple(figure["panels"])
    fig, axes = layout if layout is not None and titles == PANELS else empty_figure(titles)
    for col, (title, images) in enumerate(figure["panels"].items()):
        jacobian = title.startswith("Jacobian")
        for row, image in enumerate(images):
            axes[row, col].imshow(image, cmap="RdBu_r" if jacobian else "gray", aspect=figure["aspects"][row],
                                  interpolation="nearest", vmin=0, vmax=2 if jacobian else 0.5 if
                                  title.startswith("difference") else 1)
        if title in ("fixed", "warped (after)", "overlay after"):
            for key, edges in figure.get("outlines", {}).items():
                for ax, edge in zip(axes[:, col], edges):
                    rgba = np.zeros((*edge.shape, 4), np.float32)
                    rgba[edge] = (*OUTLINE_COLOURS[key], 1.0)
                    ax.imshow(rgba, aspect=ax.get_aspect(), interpolation="nearest")
        if figure["landmarks"] is not None and title in ("fixed", "warped (after)"):
            _draw_landmarks(axes[:, col], figure["landmarks"], moving=title != "fixed")
    _legend(fig, figure)
    return fig


def _legend(fig, figure: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="none", marker="s", markerfacecolor=(1, 0, 1), markeredgecolor="none",
                      label=OVERLAY_NOTE)]
    if figure["landmarks"] is not None:
        handles += [Line2D([], [], linestyle="none", marker="+", color="lime", label="fixed landmark"),
                    Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="lime",
                           label="where its moving landmark should land"),
                    Line2D([], [], linestyle="none", marker="x", color="red", label="moving landmark, registered")]
    for key in figure.get("outlines", {}):
        handles.append(Line2D([], [], color=OUTLINE_COLOURS[key],
                              label="fixed labels' outlines" if key == "fixed" else "warped moving labels' outlines"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)


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


def registration_report(fixed: sitk.Image, before: sitk.Image, warped: sitk.Image, jacobian: sitk.Image | None,
                        path: str | Path, metrics: dict | None = None, landmarks: dict | None = None,
                        outlines: dict | None = None) -> Path:
    """The registration figure in this process. ``landmarks``: {"fixed": (n, 3), "moving": (n, 3)
    mapped into fixed space, LPS mm}; ``outlines``: see ``registration_panels``."""
    return draw_registration(registration_panels(fixed, before, warped, jacobian, landmarks, outlines), path, metrics)


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
