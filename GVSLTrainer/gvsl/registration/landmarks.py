"""Corresponding landmarks: Slicer markups (.mrk.json), legacy .fcsv and plain CSV files, and the target
registration error (TRE) they give.

Points are held in LPS millimetres, ITK's physical space; files in RAS are converted on reading.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SYSTEMS = {"LPS": np.array([1.0, 1.0, 1.0]), "RAS": np.array([-1.0, -1.0, 1.0])}  # per-axis sign to LPS
_FCSV_CODES = {"0": "RAS", "1": "LPS"}  # Slicer 4 wrote the system as a number


class LandmarkError(ValueError):
    """A landmark file that cannot be used, naming the file and the problem."""


@dataclass
class Landmarks:
    points: np.ndarray  # (n, 3) LPS mm
    labels: list[str]
    path: str = ""


def read_landmarks(path: str | Path) -> Landmarks:
    """Read a Slicer markups JSON (.mrk.json / .json), a legacy .fcsv or a CSV of x, y, z (LPS unless
    its header says RAS: columns r, a, s or a '# CoordinateSystem = RAS' line)."""
    path = Path(path)
    if not path.is_file():
        raise LandmarkError(f"{path}: no such landmark file")
    name = path.name.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
        if name.endswith(".json"):
            points, labels, system = _markups_json(text)
        elif name.endswith(".fcsv"):
            points, labels, system = _fcsv(text)
        elif name.endswith((".csv", ".txt")):
            points, labels, system = _csv(text)
        else:
            raise LandmarkError("unknown landmark format; use a Slicer markups .mrk.json, a .fcsv or a .csv of x,y,z")
    except LandmarkError as e:
        raise LandmarkError(f"{path}: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise LandmarkError(f"{path}: cannot be read as landmarks ({type(e).__name__}: {e})") from None
    if system not in SYSTEMS:
        raise LandmarkError(f"{path}: unknown coordinate system {system!r}; landmarks must be in LPS or RAS")
    if not points:
        raise LandmarkError(f"{path}: holds no landmarks")
    array = np.array(points, dtype=np.float64) * SYSTEMS[system]
    if not np.isfinite(array).all():
        raise LandmarkError(f"{path}: holds non-finite coordinates")
    return Landmarks(array, labels, str(path))


def _markups_json(text: str):
    doc = json.loads(text)
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not markups:
        raise LandmarkError("a markups JSON file needs a 'markups' list")
    points, labels, systems = [], [], set()
    for markup in markups:
        systems.add(str(markup.get("coordinateSystem", "LPS")).upper())
        for i, cp in enumerate(markup.get("controlPoints", [])):
            if cp.get("positionStatus", "defined") != "defined" or "position" not in cp:
                continue
            position = cp["position"]
            label = str(cp.get("label") or i + 1)
            if not isinstance(position, list) or len(position) != 3:
                raise LandmarkError(f"control point {label!r} has position {position!r}; a point needs 3 coordinates")
            points.append([float(v) for v in position])
            labels.append(label)
    if len(systems) > 1:
        raise LandmarkError(f"mixes coordinate systems {sorted(systems)}")
    return points, labels, systems.pop() if systems else "LPS"


def _fcsv(text: str):
    system, columns, points, labels = "RAS", None, [], []  # files before Slicer 4.11 had no system line: RAS
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = _FCSV_CODES.get(value, value.upper())
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        if not line.strip():
            continue
        row = next(csv.reader([line]))
        cols = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label"]
        record = dict(zip(cols, row))
        points.append([float(record[c]) for c in ("x", "y", "z")])
        labels.append(record.get("label") or str(len(labels) + 1))
    return points, labels, system


def _csv(text: str):
    system, points, labels, header = "LPS", [], [], None
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = value.strip().upper()
            continue
        if line.strip():
            rows.append([c.strip() for c in next(csv.reader([line]))])
    if rows and not _numeric(rows[0]):
        header = [c.lower() for c in rows.pop(0)]
        for axes, name in ((("r", "a", "s"), "RAS"), (("l", "p", "s"), "LPS")):
            if all(a in header for a in axes):
                system, header = name, [{"r": "x", "l": "x", "a": "y", "p": "y", "s": "z"}.get(c, c) for c in header]
        if not all(a in header for a in ("x", "y", "z")):
            raise LandmarkError(f"CSV header {header} names no x, y, z (or r, a, s / l, p, s) columns")
    for row in rows:
        if header:
            record = dict(zip(header, row))
            points.append([float(record[c]) for c in ("x", "y", "z")])
            labels.append(record.get("label") or str(len(labels) + 1))
        else:
            numbers = [c for c in row if _number(c)]
            if len(numbers) < 3:
                raise LandmarkError(f"row {row} has fewer than three coordinates")
            points.append([float(c) for c in numbers[:3]])
            text_cells = [c for c in row if c and not _number(c)]
            labels.append(text_cells[0] if text_cells else str(len(labels) + 1))
    return points, labels, system


def _number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _numeric(row: list[str]) -> bool:
    return sum(_number(c) for c in row) >= 3


def _trailing_number(label: str) -> str | None:
    match = re.search(r"(\d+)$", label)
    return match.group(1) if match else None


def pair(fixed: Landmarks, moving: Landmarks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(fixed points, moving points, labels) in corresponding order.

    Points are matched by label when both files name the same landmarks (in any order), by the
    number their labels end with when only the prefixes differ (Slicer's default names, F-1 and M-1),
    else by order where the labels are only indices.
    """
    if len(fixed.points) != len(moving.points):
        raise LandmarkError(f"{fixed.path} holds {len(fixed.points)} landmarks but {moving.path} holds "
                            f"{len(moving.points)}; corresponding landmarks come in equal numbers")
    for key in (lambda s: s, _trailing_number):
        f_keys, m_keys = [key(s) for s in fixed.labels], [key(s) for s in moving.labels]
        if None not in f_keys and len(set(f_keys)) == len(f_keys) and set(f_keys) == set(m_keys):
            order = [m_keys.index(k) for k in f_keys]
            return fixed.points, moving.points[order], list(fixed.labels)
    if all(s.isdigit() for s in fixed.labels + moving.labels):
        return fixed.points, moving.points, list(fixed.labels)
    missing = sorted(set(fixed.labels) ^ set(moving.labels))[:5]
    raise LandmarkError(f"the labels of {fixed.path} and {moving.path} do not correspond (e.g. {missing}); "
                        "name corresponding landmarks alike, or number them in the same order")


def target_registration_error(transform: sitk.Transform | None, fixed_points: np.ndarray,
                              moving_points: np.ndarray, labels: list[str]) -> dict:
    """Distances between the fixed landmarks mapped by ``transform`` (fixed -> moving; None: as the files
    place them) and their moving counterparts."""
    mapped = fixed_points if transform is None else np.array([transform.TransformPoint(p.tolist())
                                                              for p in fixed_points])
    errors = np.linalg.norm(mapped - moving_points, axis=1)
    return {"mean_mm": round(float(errors.mean()), 3), "max_mm": round(float(errors.max()), 3),
            "points": {label: round(float(e), 3) for label, e in zip(labels, errors)}}


MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
                  "markups-schema-v1.0.3.json#")


def landmarks_text(landmarks: Landmarks, name: str) -> str:
    """``landmarks`` as the file ``name`` would hold them (its extension picks the format: a Slicer
    markups .mrk.json, a .fcsv or a .csv), in LPS millimetres, saying so, so that Slicer and
    ``read_landmarks`` read them back where they are."""
    name = name.lower()
    if name.endswith(".json"):
        points = [{"id": str(i + 1), "label": label, "position": [round(float(v), 6) for v in p],
                   "positionStatus": "defined"} for i, (label, p) in enumerate(zip(landmarks.labels, landmarks.points))]
        return json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [
            {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "controlPoints": points}]},
            indent=2)
    rows = [[label, *(f"{float(v):.6f}" for v in p)] for label, p in zip(landmarks.labels, landmarks.points)]
    if name.endswith(".fcsv"):
        head = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
        return head + "".join(f"{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{label},,\n" for i, (label, x, y, z) in enumerate(rows))
    if name.endswith((".csv", ".txt")):
        return "# CoordinateSystem = LPS\nlabel,x,y,z\n" + "".join(",".join(r) + "\n" for r in rows)
    raise LandmarkError(f"{name}: unknown landmark format; use .mrk.json, .fcsv or .csv")
