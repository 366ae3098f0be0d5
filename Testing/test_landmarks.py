"""Landmark files in every format users have, read point by point, and the errors on bad ones."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.registration.landmarks import LandmarkError, Landmarks, pair, read_landmarks, target_registration_error

LPS = np.array([[10.5, -20.25, 30.0], [-4.0, 5.5, -60.125], [0.0, 12.0, 7.75]])
RAS = LPS * [-1, -1, 1]


def markups(path, points, system, labels=("a", "b", "c")):
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": [
        {"label": lab, "position": p.tolist(), "positionStatus": "defined"} for lab, p in zip(labels, points)]}]}))
    return path


@pytest.mark.parametrize("name, text, labels", [
    ("lps.mrk.json", None, ["a", "b", "c"]),
    ("ras.mrk.json", None, ["a", "b", "c"]),
    ("ras.fcsv", "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
     + "".join(f"n{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i + 1},,\n" for i, (x, y, z) in enumerate(RAS)), ["F-1", "F-2", "F-3"]),
    ("lps-code.fcsv", "# Markups fiducial file version = 4.6\n# CoordinateSystem = 1\n"
     + "".join(f"n{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i + 1},,\n" for i, (x, y, z) in enumerate(LPS)), ["F-1", "F-2", "F-3"]),
    ("legacy.fcsv", "# Markups fiducial file version = 4.4\n"  # no system line: Slicer wrote RAS
     + "".join(f"n{i},{x},{y},{z},0,0,0,1,1,1,0,P{i + 1},,\n" for i, (x, y, z) in enumerate(RAS)), ["P1", "P2", "P3"]),
    ("plain.csv", "".join(f"{x},{y},{z}\n" for x, y, z in LPS), ["1", "2", "3"]),
    ("header.csv", "label,x,y,z\n" + "".join(f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(LPS)),
     ["p0", "p1", "p2"]),
    ("slicer.csv", "label,r,a,s,defined\n" + "".join(f"p{i},{x},{y},{z},1\n" for i, (x, y, z) in enumerate(RAS)),
     ["p0", "p1", "p2"]),
    ("declared.csv", "# CoordinateSystem = RAS\n" + "".join(f"{x} ,{y}, {z}\n" for x, y, z in RAS), ["1", "2", "3"]),
])
def test_every_format_reads_to_lps(tmp_path, name, text, labels):
    path = tmp_path / name
    if text is None:
        markups(path, LPS if name.startswith("lps") else RAS, name.split(".")[0].upper())
    else:
        path.write_text(text)
    lm = read_landmarks(path)
    np.testing.assert_allclose(lm.points, LPS, atol=1e-9)
    assert lm.labels == labels


def test_pairs_match_by_label_then_by_number():
    fixed = Landmarks(LPS, ["a", "b", "c"], "f")
    moving = Landmarks(LPS[[2, 0, 1]] + 1, ["c", "a", "b"], "m")
    f, m, labels = pair(fixed, moving)
    np.testing.assert_allclose(m, LPS + 1)
    f, m, _ = pair(Landmarks(LPS, ["F-1", "F-2", "F-3"]), Landmarks(LPS[::-1], ["M-3", "M-2", "M-1"]))
    np.testing.assert_allclose(m, LPS)
    tre = target_registration_error(sitk.TranslationTransform(3, (3.0, 4.0, 0.0)), LPS, LPS + [3, 4, 0], labels)
    assert tre["mean_mm"] == pytest.approx(0) and target_registration_error(None, LPS, LPS + [3, 4, 0], labels)[
        "max_mm"] == pytest.approx(5)


def test_bad_landmarks_are_named(tmp_path):
    with pytest.raises(LandmarkError, match="holds 3 landmarks but .* holds 2"):
        pair(Landmarks(LPS, ["1", "2", "3"], "f.csv"), Landmarks(LPS[:2], ["1", "2"], "m.csv"))
    with pytest.raises(LandmarkError, match="do not correspond"):
        pair(Landmarks(LPS, ["nose", "ear", "eye"], "f"), Landmarks(LPS, ["nose", "ear", "chin"], "m"))
    bad = markups(tmp_path / "ijk.mrk.json", LPS, "IJK")
    with pytest.raises(LandmarkError, match=r"ijk.mrk.json: unknown coordinate system 'IJK'"):
        read_landmarks(bad)
    (tmp_path / "words.csv").write_text("name,colour\nnose,red\n")
    with pytest.raises(LandmarkError, match="words.csv: .*names no x, y, z"):
        read_landmarks(tmp_path / "words.csv")
    (tmp_path / "empty.fcsv").write_text("# CoordinateSystem = LPS\n")
    with pytest.raises(LandmarkError, match="empty.fcsv: holds no landmarks"):
        read_landmarks(tmp_path / "empty.fcsv")
