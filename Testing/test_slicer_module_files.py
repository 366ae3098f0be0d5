"""The parts of the Slicer module that need the Slicer application, checked statically: GVSL.py
against Resources/UI/GVSL.ui and GVSLLogic, and the CMake files against the files they must ship."""
from __future__ import annotations

import ast
import inspect
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "GVSLExtension" / "GVSL.py"
UI = ROOT / "Resources" / "UI" / "GVSL.ui"
# which widget classes parameterNodeWrapper's GUI connectors bind to each parameter type
NODE_TYPES = ("vtkMRMLScalarVolumeNode", "vtkMRMLTransformNode", "vtkMRMLSegmentationNode", "vtkMRMLLinearTransformNode",
              "vtkMRMLMarkupsFiducialNode", "Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]")
WIDGETS_FOR_TYPE = {**{t: {"qMRMLNodeComboBox"} for t in NODE_TYPES}, "pathlib.Path": {"ctkPathLineEdit"},
                    "bool": {"QCheckBox"}, "int": {"QSpinBox", "ctkSliderWidget"},
                    "str": {"QComboBox", "QLineEdit", "ctkPathLineEdit"},  # the last through GVSL.py's connector
                    "list[vtkMRMLSegmentationNode]": {"qMRMLCheckableNodeComboBox"}}  # GVSL.py's connector too


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text())


@pytest.fixture(scope="module")
def ui() -> dict:
    """{widget name: (class, SlicerParameterName or None)} of the .ui file (which must parse)."""
    root = ET.parse(UI).getroot()
    out = {}
    for w in root.iter("widget"):
        param = [p.find("string").text for p in w.findall("property") if p.get("name") == "SlicerParameterName"]
        out[w.get("name")] = (w.get("class"), param[0] if param else None)
    return out


def wrapper_fields(tree: ast.Module) -> dict[str, str]:
    """{parameter: its type's source} of the @parameterNodeWrapper class."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    annotation = item.annotation
                    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
                        annotation = annotation.slice.elts[0]
                    fields[item.target.id] = ast.unparse(annotation)
            return fields
    raise AssertionError("GVSL.py has no @parameterNodeWrapper class")


def attributes_of(tree: ast.Module, owner: str) -> set[str]:
    """Names X used as self.<owner>.X in GVSL.py."""
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == owner and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


def test_every_widget_the_code_uses_is_in_the_ui_file(module_tree, ui):
    used = attributes_of(module_tree, "ui")
    assert {"registerButton", "segmentButton", "progressBar", "metricsLabel", "openTemporaryFolderButton"} <= used
    assert used - set(ui) == set()


def test_every_parameter_has_exactly_one_widget_of_a_class_that_can_show_it(module_tree, ui):
    fields = wrapper_fields(module_tree)
    assert {"fixedVolume", "movingVolume", "registrationModel", "iterations", "device", "outputVolume",
            "outputTransform", "splitTransforms", "movingSegmentation", "segmentInputVolume", "segmentationModel",
            "segmentationAtlases", "segmentationAtlasNodes", "outputSegmentation", "registrationMode", "similarity", "fixedMask", "movingMask", "initialTransform",
            "fixedLandmarks", "movingLandmarks", "preset", "keepTemporaryFiles"} <= set(fields)
    bound = {}
    for name, (cls, param) in ui.items():
        if param is not None:
            assert param not in bound, f"{param} is bound to {bound[param][0]} and {name}"
            bound[param] = (name, cls)
    assert set(bound) == set(fields), "parameters without a widget, or widgets naming no parameter"
    for param, type_source in fields.items():
        assert bound[param][1] in WIDGETS_FOR_TYPE[type_source], (param, type_source, bound[param])


COMBOS = ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")


def test_combo_boxes_list_the_node_types_of_their_parameters(module_tree):
    fields = wrapper_fields(module_tree)
    root = ET.parse(UI).getroot()
    for w in root.iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        if w.get("class") in COMBOS:
            param = props["SlicerParameterName"].find("string").text
            types = [s.text for s in props["nodeTypes"].iter("string")]
            expected = re.findall(r"vtkMRML\w+", fields[param])  # a Union lists each of its node classes
            assert types == expected, (w.get("name"), types)
    connections = {(c.findtext("receiver"), c.findtext("slot")) for c in root.iter("connection")}
    combos = {w.get("name") for w in root.iter("widget") if w.get("class") in COMBOS}
    assert {(name, "setMRMLScene(vtkMRMLScene*)") for name in combos} <= connections


def test_the_widget_calls_the_logic_as_it_is(module_tree):
    """Every self.logic.X(...) and GVSLLogic.X(...) call in GVSL.py names a method and keywords that exist."""
    sys.path.insert(0, str(ROOT / "GVSLExtension"))
    pytest.importorskip("slicer")
    from GVSLLib.logic import GVSLLogic

    calls = 0
    for node in ast.walk(module_tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Call):  # GVSLLogic().register(...)
            owner = owner.func
        is_logic = (isinstance(owner, ast.Attribute) and owner.attr == "logic") or \
            (isinstance(owner, ast.Name) and owner.id == "GVSLLogic")
        if not is_logic:
            continue
        if node.func.attr == "getParameterNode":  # ScriptedLoadableModuleLogic's, in Slicer
            continue
        method = getattr(GVSLLogic, node.func.attr)
        parameters = inspect.signature(method).parameters
        for keyword in node.keywords:  # **panel.registrationArguments(p): checked against the signature there
            assert keyword.arg is None or keyword.arg in parameters, f"{node.func.attr}() has no parameter {keyword.arg}"
        calls += 1
    assert calls >= 3


def test_cmake_files_name_every_module_file():
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", top), key
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', top)
    assert re.search(r'set\(EXTENSION_CATEGORY "Registration"\)', top)
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(GVSLExtension)" in top

    cmake = (ROOT / "GVSLExtension" / "CMakeLists.txt").read_text()

    def listed(variable: str) -> set[str]:
        body = re.search(rf"set\({variable}\n(.*?)\n\s*\)", cmake, re.S).group(1)
        return {line.strip().replace("${MODULE_NAME}", "GVSL") for line in body.splitlines() if line.strip()}

    scripts = listed("MODULE_PYTHON_SCRIPTS")
    shipped = {str(p.relative_to(ROOT / "GVSLExtension")) for p in (ROOT / "GVSLExtension").rglob("*.py")}
    assert scripts == shipped
    shared = listed("MODULE_SHARED_FILES")
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "GVSLTrainer" / "gvsl").rglob("*.py")}
    needed |= {"GVSLTrainer/register.py", "GVSLTrainer/segment.py", "Resources/UI/GVSL.ui", "Resources/Icons/GVSL.png"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "Resources" / "SampleData").iterdir()}
    assert shared == needed
    assert all((ROOT / f).is_file() for f in shared)
    assert "slicerMacroBuildScriptedModule" in cmake and "NAME ${MODULE_NAME}" in cmake


def test_the_gui_offers_the_registrations_names_without_torch():
    """The module's choices are gvsl's own, read from a module that imports no torch."""
    import subprocess

    sys.path.insert(0, str(ROOT / "GVSLExtension"))
    pytest.importorskip("slicer")
    from GVSLLib.logic import DEVICES, MODES, SIMILARITIES

    from gvsl.registration import MODES as GVSL_MODES
    from gvsl.runtime import DEVICES as GVSL_DEVICES
    from gvsl.similarity import SIMILARITIES as GVSL_SIMILARITIES

    assert (MODES, SIMILARITIES, DEVICES) == (GVSL_MODES, GVSL_SIMILARITIES, GVSL_DEVICES)
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gvsl.choices; "
                            "print('torch' in sys.modules)", str(ROOT / "GVSLTrainer")], capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr


def test_the_gui_never_imports_torch(module_tree):
    """Not at module level, not in a method: importing torch on Slicer's GUI thread freezes it, and a
    loaded torch blocks PyTorchUtils' upgrade on Windows. The child process reports its device."""
    for node in ast.walk(module_tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "torch" for a in node.names), ast.unparse(node)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "torch", ast.unparse(node)
    for path in (ROOT / "GVSLExtension" / "GVSLLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "torch" for n in names), (path.name, ast.unparse(node))


def test_every_union_of_node_types_includes_none(module_tree):
    """Slicer's wrapper writes a node parameter's default, None, to a fresh parameter node; a Union has a
    serializer for None only if it names None (found by running GVSL.py through Slicer's wrapper)."""
    fields = wrapper_fields(module_tree)
    unions = {name: t for name, t in fields.items() if t.startswith(("Union[", "typing.Union[", "Optional[")) or "|" in t}
    assert unions, "the masks are unions of segmentation and label map nodes"
    for name, t in unions.items():
        members = [m.strip() for m in re.split(r"[\[\],|]", t) if m.strip() and m.strip() not in ("Union", "typing.Union")]
        assert t.startswith("Optional[") or "None" in members, f"{name}: {t} has no None"


def test_a_none_item_says_what_happens(ui):
    """"Create new ..." only where the logic creates that node when nothing is selected."""
    creates = {"outputTransform", "outputSegmentation"}
    root = ET.parse(UI).getroot()
    for w in root.iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        if w.get("class") == "qMRMLNodeComboBox" and "noneDisplay" in props:
            text = props["noneDisplay"].find("string").text
            param = props["SlicerParameterName"].find("string").text
            if text.lower().startswith("create"):
                assert param in creates, (param, text)
    output_volume = next(w for w in root.iter("widget") if w.get("name") == "outputVolumeSelector")
    none_text = next(p for p in output_volume.findall("property") if p.get("name") == "noneDisplay").find("string").text
    assert "moving volume" in none_text and "transform" in none_text


def test_the_self_test_runs_under_ctest_and_passes_without_its_packages(module_tree):
    """Without torch/MONAI the self-test says so and returns: skipTest raises outside a test runner, and
    Reload and Test runs it outside one. With them it runs the buttons' child-process path."""
    cmake = (ROOT / "GVSLExtension" / "CMakeLists.txt").read_text()
    assert re.search(r"if\(BUILD_TESTING\)\s*(#[^\n]*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)",
                     cmake)
    test = next(n for n in ast.walk(module_tree) if isinstance(n, ast.FunctionDef)
                and n.name == "test_register_recovers_a_known_transform")
    source = ast.unparse(test)
    assert "skipTest" not in MODULE.read_text()
    first = ast.unparse(test.body[0]) + ast.unparse(test.body[1])
    assert "dependencies.missingPackages()" in first and "return" in ast.unparse(test.body[1])
    assert "startRegistration(" in source and "SampleData.downloadSamples(selftest.SAMPLE_NAME)" in source


def test_module_file_keeps_logic_out(module_tree):
    """GVSL.py imports no gvsl job and no torch at module level: Slicer starts without them."""
    imported = {alias.name.split(".")[0] for node in module_tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"torch", "gvsl", "monai", "SimpleITK"}


def test_model_fields_are_strings_shown_empty_through_a_registered_connector(module_tree):
    """Slicer's own path connector shows Path() as "."; the model fields are str parameters, which only
    GVSL.py's ctkPathLineEdit connector can show."""
    fields = wrapper_fields(module_tree)
    assert fields["registrationModel"] == fields["segmentationModel"] == fields["segmentationAtlases"] == "str"
    defaults = {item.target.id: ast.literal_eval(item.value) for node in module_tree.body if isinstance(node, ast.ClassDef)
                for item in node.body if isinstance(item, ast.AnnAssign) and item.value is not None
                and item.target.id in ("registrationModel", "segmentationModel", "segmentationAtlases")}
    assert defaults == {"registrationModel": "", "segmentationModel": "", "segmentationAtlases": ""}
    connectors = [node for node in module_tree.body if isinstance(node, ast.ClassDef)
                  and any(getattr(d, "id", None) == "parameterNodeGuiConnector" for d in node.decorator_list)]
    sources = {node.name: ast.unparse(node) for node in connectors}
    assert set(sources) == {"PathLineEditToStrConnector", "CheckableNodeComboBoxToNodeListConnector"}
    source = sources["PathLineEditToStrConnector"]
    assert "ctk.ctkPathLineEdit" in source and "datatype == str" in source and "currentPathChanged" in source
    source = sources["CheckableNodeComboBoxToNodeListConnector"]
    assert "slicer.qMRMLCheckableNodeComboBox" in source and "checkedNodesChanged" in source


def test_presets_set_only_existing_options_to_values_the_gui_offers(module_tree):
    sys.path.insert(0, str(ROOT / "GVSLExtension"))
    from GVSLLib import presets
    from GVSLLib.logic import MODES, SIMILARITIES

    fields = wrapper_fields(module_tree)
    assert presets.CUSTOM == presets.NAMES[0] and len(presets.PRESETS) >= 3
    for name, values in presets.PRESETS.items():
        assert set(values) <= set(fields), name
        assert values["registrationMode"] in MODES and values["similarity"] in SIMILARITIES
    assert len({tuple(sorted(v.items())) for v in presets.PRESETS.values()}) == len(presets.PRESETS)  # distinct


def test_a_preset_sets_its_options_and_the_box_names_what_they_are():
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "GVSLExtension"))
    from GVSLLib import presets

    p = SimpleNamespace(registrationMode="deformable", similarity="auto", iterations=100)
    assert presets.matchingPreset(p) == presets.CUSTOM
    presets.applyPreset(p, "CT↔MR, rigid")
    assert (p.registrationMode, p.similarity, p.iterations) == ("rigid", "mi", 100)
    assert presets.matchingPreset(p) == "CT↔MR, rigid"
    p.similarity = "ncc"  # the user changes an option: no preset describes them any more
    assert presets.matchingPreset(p) == presets.CUSTOM
    presets.applyPreset(p, presets.CUSTOM)
    assert p.similarity == "ncc"
    with pytest.raises(ValueError, match="unknown preset"):
        presets.applyPreset(p, "Fast")
    # what the widget runs after every change of its parameter node
    p = SimpleNamespace(preset="Custom", registrationMode="deformable", similarity="auto")
    p.preset = "Rigid head"  # chosen in the box
    assert presets.follow(p, "Custom") == "Rigid head" and (p.registrationMode, p.similarity) == ("rigid", "auto")
    p.registrationMode = "affine"  # then an option by hand
    assert presets.follow(p, "Rigid head") == "Affine, any modality" == p.preset
    p.similarity = "mind"
    assert presets.follow(p, p.preset) == presets.CUSTOM == p.preset


def test_the_log_and_inputs_during_a_run(module_tree, ui):
    """The live log is filled from the process at every poll, and every parameter widget is disabled
    while a run goes (checked in the source: only the application can click)."""
    source = MODULE.read_text()
    assert ui["logTextEdit"][0] == "QPlainTextEdit" and ui["keepTemporaryFilesCheckBox"][1] == "keepTemporaryFiles"
    assert "process.newLines()" in source and "_setInputsEnabled(False)" in source and \
        "_setInputsEnabled(True)" in source


def test_a_sample_pair_is_registered_with_sample_data_at_start_up(module_tree):
    """The SampleData source is registered once the application started (as the module template does),
    by local file URL and checksum and without a custom downloader, which only the button would call."""
    import hashlib

    import SimpleITK as sitk

    source = MODULE.read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert "registerCustomSampleDataSource(**selftest.sampleDataSource())" in source
    sys.path.insert(0, str(ROOT / "GVSLExtension"))
    pytest.importorskip("slicer")
    from GVSLLib import selftest

    kwargs = selftest.sampleDataSource()
    assert "customDownloader" not in kwargs and len(kwargs["uris"]) == len(kwargs["nodeNames"]) == 2
    for uri, path, checksum in zip(kwargs["uris"], selftest.sampleFiles(), kwargs["checksums"]):
        assert uri == path.as_uri() and checksum == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    # the fixed file is the moving one moved by the known transform, as the self-test assumes
    fixed, moving = (sitk.ReadImage(str(p)) for p in selftest.sampleFiles())
    again, _ = selftest.samplePair(moving)
    assert again.GetSize() == fixed.GetSize() and again.GetDirection() == pytest.approx(fixed.GetDirection())
    difference = sitk.GetArrayFromImage(again).astype(int) - sitk.GetArrayFromImage(fixed)
    assert abs(difference).max() <= 1


def test_extension_metadata_follows_slicers_template():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in top  # Slicer 5.10's template
    homepages = re.findall(r"set\(EXTENSION_HOMEPAGE ([^)]*)\)", top)
    assert homepages and not any("YutingHe-list" in h for h in homepages)  # not the method's research code
    assert 'set(EXTENSION_ICONURL "${GVSL_REPOSITORY_URL}/raw/main/Resources/Icons/GVSL.png")' in top
    assert (ROOT / "Resources" / "Icons" / "GVSL.png").is_file()
