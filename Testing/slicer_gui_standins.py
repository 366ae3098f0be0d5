"""Inert stand-ins for what only the Slicer application has (Qt, CTK, the qMRML widgets and
``slicer.app``), so that Slicer's own Python (``parameterNodeWrapper``, ``ScriptedLoadableModule``,
``SampleData``; read from a Slicer source tree) can run ``GVSL.py`` beside slicer-core's real MRML.

The stand-ins only hold state and call back: a widget keeps its properties, a signal calls what is
connected to it, ``QUiLoader`` builds the widget tree of a ``.ui`` file with its properties and
connections. Nothing here decides anything the module's code or Slicer's code decides.
"""
from __future__ import annotations

import inspect
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable


def _call(slot: Callable, args: tuple):
    """Call ``slot`` with as many of ``args`` as it takes (PythonQt does the same)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    count = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    return slot(*args[:count])


class Signal:
    def __init__(self):
        self._slots: list[Callable] = []

    def connect(self, slot: Callable) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable | None = None) -> None:
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            _call(slot, args)

    def __len__(self) -> int:
        return len(self._slots)


class QObject:
    SIGNALS: tuple[str, ...] = ()

    def __init__(self, parent=None):
        self._dynamic: dict = {}
        self._children: list = []
        self._parent = None
        self.name = ""
        for cls in type(self).__mro__:
            for signal in getattr(cls, "SIGNALS", ()):
                if not hasattr(self, signal):
                    setattr(self, signal, Signal())
        if parent is not None:
            self.setParent(parent)

    # PythonQt's old-style connect("clicked(bool)", slot)
    def connect(self, signature: str, slot: Callable) -> None:
        getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature: str, slot: Callable | None = None) -> None:
        getattr(self, signature.split("(")[0]).disconnect(slot)

    @property
    def objectName(self) -> str:
        return self.name

    def setObjectName(self, name: str) -> None:
        self.name = name

    def property(self, name: str):
        return self._dynamic.get(name)

    def setProperty(self, name: str, value) -> None:
        self._dynamic[name] = value

    def setParent(self, parent) -> None:
        if self._parent is not None:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def parent(self):
        return self._parent

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, kind=None) -> list:
        found = []
        for child in self._children:
            if kind is None or isinstance(child, kind):
                found.append(child)
            found += child.findChildren(kind)
        return found

    def className(self) -> str:
        return type(self).__name__

    def isWidgetType(self) -> bool:
        return isinstance(self, QWidget)


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.text = ""
        self._layout = None

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setLayout(self, layout) -> None:
        self._layout = layout
        layout.owner = self

    def layout(self):
        return self._layout


class QLayout(QObject):
    owner = None

    def __init__(self, parent=None):
        super().__init__()
        if parent is not None:
            parent.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        widget.setParent(self.owner)

    def addRow(self, *items) -> None:
        for item in items:
            if isinstance(item, QWidget):
                item.setParent(self.owner)

    def addLayout(self, layout, *args) -> None:
        pass


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled", "stateChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.toggled.emit(self._checked)
            self.stateChanged.emit(2 if self._checked else 0)

    def click(self) -> None:
        """What a user's click does: nothing on a disabled button."""
        if not self.enabled:
            return
        if self.checkable or isinstance(self, QCheckBox):
            self.checked = not self.checked
        self.clicked.emit(self.checked)


class QCheckBox(QAbstractButton):
    pass


class QPushButton(QAbstractButton):
    pass


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged", "currentTextChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[str] = []
        self._index = -1

    def addItem(self, text: str) -> None:
        self._items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def clear(self) -> None:
        self._items = []
        self.currentIndex = -1

    @property
    def count(self) -> int:
        return len(self._items)

    def itemText(self, index: int) -> str:
        return self._items[index]

    def findText(self, text: str) -> int:
        return self._items.index(text) if text in self._items else -1

    def model(self):
        """The item model: items that can be enabled or disabled, nothing more."""
        items = [types.SimpleNamespace(enabled=True) for _ in self._items]
        for item in items:
            item.setEnabled = lambda value, item=item: setattr(item, "enabled", bool(value))
            item.isEnabled = lambda item=item: item.enabled
        return types.SimpleNamespace(item=lambda i: items[i], rowCount=lambda: len(items))

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    @property
    def currentText(self) -> str:
        return self._items[self._index] if 0 <= self._index < len(self._items) else ""


class QSpinBox(QWidget):
    SIGNALS = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self._value = 0, 99, 0

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.value = self._value

    def setMinimum(self, minimum) -> None:
        self.setRange(minimum, max(minimum, self.maximum))

    def setMaximum(self, maximum) -> None:
        self.setRange(min(self.minimum, maximum), maximum)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = min(max(value, self.minimum), self.maximum)  # Qt clamps
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.format = 0, "%p%"


class QPlainTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.readOnly, self.maximumBlockCount, self.lines = False, 0, []

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def clear(self) -> None:
        self.lines = []

    def toPlainText(self) -> str:
        return "\n".join(self.lines)


class QTimer(QObject):
    """Timers fire only when the test says so (``fireTimers``); single shots wait in ``pending``."""
    SIGNALS = ("timeout",)
    pending: list[Callable] = []
    running: list["QTimer"] = []

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self, ms: int | None = None) -> None:
        if self not in QTimer.running:
            QTimer.running.append(self)

    def stop(self) -> None:
        if self in QTimer.running:
            QTimer.running.remove(self)

    def isActive(self) -> bool:
        return self in QTimer.running

    @staticmethod
    def singleShot(ms: int, slot: Callable) -> None:
        QTimer.pending.append(slot)


def processEvents() -> None:
    """Run what was deferred with ``QTimer.singleShot``."""
    while QTimer.pending:
        QTimer.pending.pop(0)()


def fireTimers() -> None:
    for timer in list(QTimer.running):
        timer.timeout.emit()


class QSettings(QObject):
    def value(self, key, default=None):
        return default

    def contains(self, key) -> bool:
        return False

    def setValue(self, key, value) -> None:
        pass


class QIcon:
    def __init__(self, path: str = ""):
        self.path = path


class QUrl:
    def __init__(self, url: str = ""):
        self.url = url

    @staticmethod
    def fromLocalFile(path: str) -> "QUrl":
        return QUrl("file://" + str(path))

    def toLocalFile(self) -> str:
        return self.url[len("file://"):] if self.url.startswith("file://") else ""


class QDesktopServices:
    opened: list = []

    @staticmethod
    def openUrl(url) -> bool:
        QDesktopServices.opened.append(url)
        return True


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = Path(str(path))

    def exists(self) -> bool:
        return self.path.exists()

    def open(self, mode) -> bool:
        return self.path.exists()

    def remove(self) -> bool:
        try:
            self.path.unlink()
            return True
        except OSError:
            return False


class QDir:
    def mkpath(self, path) -> bool:
        Path(path).mkdir(parents=True, exist_ok=True)
        return True


class Qt:
    """``qt.Qt``'s check states."""
    Unchecked, PartiallyChecked, Checked = 0, 1, 2


# ------------------------------------------------------------------ CTK and qMRML widgets
class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.collapsed = False


class ctkPathLineEdit(QWidget):
    SIGNALS = ("currentPathChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self.filters, self.nameFilters = 0, []

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        if str(path) != self._path:
            self._path = str(path)
            self.currentPathChanged.emit(self._path)


class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(qMRMLWidget):
    """Lists the scene's nodes of ``nodeTypes``; like the real one, it can only select such a node."""
    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes, self.showChildNodeTypes = [], True
        self.noneEnabled = self.addEnabled = self.removeEnabled = self.renameEnabled = False
        self.noneDisplay = "None"
        self._node = None

    def acceptsNode(self, node) -> bool:
        if node is None:
            return self.noneEnabled
        if self._scene is None or self._scene.GetNodeByID(node.GetID()) is not node:
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def currentNode(self):
        if self._node is not None and (self._scene is None or self._scene.GetNodeByID(self._node.GetID()) is None):
            self._node = None  # removed from the scene
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not None and not self.acceptsNode(node):
            raise AssertionError(f"{self.name}: cannot show {node.GetClassName()} {node.GetName()!r} "
                                 f"(node types {self.nodeTypes}, child types {self.showChildNodeTypes})")
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(node.GetID() if node else "")

    def currentNodeID(self) -> str:
        return self._node.GetID() if self._node else ""


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    """The scene's nodes of ``nodeTypes``, each checked or not (unchecked at first), as the real one."""
    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged", "checkedNodesChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._checked: list = []

    def checkedNodes(self) -> list:
        self._checked = [n for n in self._checked if self._scene is not None and self._scene.GetNodeByID(n.GetID()) is n]
        return list(self._checked)

    def checkState(self, node) -> int:
        return Qt.Checked if node in self.checkedNodes() else Qt.Unchecked

    def setCheckState(self, node, state) -> None:
        if not self.acceptsNode(node) or node is None:
            raise AssertionError(f"{self.name}: cannot check {node}")
        if (state == Qt.Checked) != (node in self.checkedNodes()):
            self._checked = [n for n in self._checked if n is not node] + ([node] if state == Qt.Checked else [])
            self.checkedNodesChanged.emit()


class qSlicerWidget(qMRMLWidget):
    pass


class qSlicerModuleWidget(qSlicerWidget):
    """The panel Slicer gives a scripted module's widget: it has a layout and knows if it is shown."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.isEntered = False
        self.setLayout(QLayout())


# ------------------------------------------------------------------ .ui files
def _value(prop: ET.Element):
    element = list(prop)[0]
    if element.tag == "string":
        return element.text or ""
    if element.tag == "bool":
        return element.text == "true"
    if element.tag == "number":
        return int(element.text)
    if element.tag == "double":
        return float(element.text)
    if element.tag == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if element.tag in ("enum", "set", "cstring"):
        return element.text
    return None  # geometry, size policies and the like: nothing a test reads


class QUiLoader:
    """Builds the stand-in widgets of a ``.ui`` file: names, properties, items and connections."""
    classes: dict[str, type] = {}

    def load(self, qfile: QFile):
        root = ET.parse(qfile.path).getroot()
        self._byName: dict[str, QObject] = {}
        top = self._widget(root.find("widget"), None)
        for connection in root.iter("connection"):
            sender = self._byName[connection.findtext("sender")]
            receiver = self._byName[connection.findtext("receiver")]
            slot = getattr(receiver, connection.findtext("slot").split("(")[0])
            sender.connect(connection.findtext("signal"), slot)
        return top

    def _widget(self, element: ET.Element, parent):
        cls = QUiLoader.classes.get(element.get("class"))
        if cls is None:
            cls = standInClass(element.get("class"), QWidget)
        widget = cls(parent)
        widget.name = element.get("name")
        self._byName[widget.name] = widget
        for prop in element.findall("property"):
            value = _value(prop)
            if prop.get("stdset") == "0":
                widget.setProperty(prop.get("name"), value)
            elif value is not None:
                setattr(widget, prop.get("name"), value)
        for item in element.findall("item"):  # combo box items
            widget.addItem(_value(item.find("property")))
        for child in element.iter("widget"):
            if child is element:
                continue
            if self._parentWidget(element, child) is element:
                self._widget(child, widget)
        return widget

    @staticmethod
    def _parentWidget(root: ET.Element, target: ET.Element):
        """The nearest enclosing <widget> of ``target`` under ``root`` (layouts and items are skipped)."""
        stack = [(root, root)]
        while stack:
            element, owner = stack.pop()
            for child in element:
                if child is target:
                    return owner
                stack.append((child, child if child.tag == "widget" else owner))
        return None


# ------------------------------------------------------------------ modules
_GENERATED: dict[str, type] = {}


def standInClass(name: str, base: type = QWidget) -> type:
    """One class per name, so that Slicer's ``type(widget) == qt.X`` checks compare like Qt's."""
    if name not in _GENERATED:
        _GENERATED[name] = type(name, (base,), {})
    return _GENERATED[name]


def _module(name: str, members: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(members)

    def __getattr__(attribute: str):  # any other Qt/CTK class: an inert widget class of that name
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return standInClass(attribute)

    module.__getattr__ = __getattr__
    return module


QT_CLASSES = {c.__name__: c for c in (QObject, QWidget, QAbstractButton, QCheckBox, QPushButton, QComboBox, QSpinBox,
                                      QProgressBar, QPlainTextEdit, QTimer, QSettings, QIcon, QUrl, QDesktopServices,
                                      QFile, QDir, QUiLoader)}
QT_CLASSES.update(QVBoxLayout=QLayout, QHBoxLayout=QLayout, QFormLayout=QLayout, QGridLayout=QLayout,
                  QLabel=standInClass("QLabel"), Qt=Qt)
CTK_CLASSES = {c.__name__: c for c in (ctkCollapsibleButton, ctkPathLineEdit)}
SLICER_WIDGETS = {c.__name__: c for c in (qMRMLWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox, qSlicerWidget,
                                          qSlicerModuleWidget)}
QUiLoader.classes.update(QT_CLASSES)
QUiLoader.classes.update(CTK_CLASSES)
QUiLoader.classes.update(SLICER_WIDGETS)


def qtModule() -> types.ModuleType:
    qt = _module("qt", dict(QT_CLASSES))
    qt.QApplication = types.SimpleNamespace(processEvents=processEvents)
    return qt


def ctkModule() -> types.ModuleType:
    return _module("ctk", dict(CTK_CLASSES))


class StandInApplication:
    """``slicer.app``: signals by name, settings, a temporary folder, and file loading through
    slicer-core's storage nodes (what the application's IO manager does for volumes)."""

    def __init__(self, temporaryPath: Path, scene_getter: Callable):
        self.temporaryPath = str(temporaryPath)
        self.cachePath = str(temporaryPath / "cache")
        self.applicationName = "Slicer"
        self.connections: dict[str, list[Callable]] = {}
        self._scene = scene_getter

    def connect(self, signature: str, slot: Callable) -> None:
        self.connections.setdefault(signature, []).append(slot)

    def disconnect(self, signature: str, slot: Callable) -> None:
        self.connections.get(signature, []).remove(slot)

    def emit(self, signature: str, *args) -> None:
        for slot in list(self.connections.get(signature, [])):
            _call(slot, args)

    def moduleManager(self):
        return self

    def translate(self, context: str, text: str) -> str:
        return text

    def userSettings(self):
        return types.SimpleNamespace(value=lambda key, default=None: {
            "Developer/SelfTestDisplayMessageDelay": "0"}.get(key, default))

    settings = userSettings

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True)

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        processEvents()

    def mainWindow(self):
        return None

    def coreIOManager(self):
        return self

    def fileType(self, path: str) -> str:
        return "VolumeFile"

    def loadNodes(self, fileType: str, properties: dict, collection) -> bool:
        import slicer

        scene = self._scene()
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(properties["fileName"])
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", properties.get("name", ""))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            scene.RemoveNode(storage)
            return False
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        collection.AddItem(node)
        return isinstance(node, slicer.vtkMRMLScalarVolumeNode)


def slicerSourcePython(source: Path) -> Path:
    """``<source>/Base/Python/slicer``: where Slicer keeps parameterNodeWrapper and ScriptedLoadableModule."""
    folder = Path(source) / "Base" / "Python" / "slicer"
    if not (folder / "parameterNodeWrapper" / "wrapper.py").is_file():
        raise FileNotFoundError(f"{source}: not a Slicer source tree (no Base/Python/slicer/parameterNodeWrapper)")
    return folder


def install(monkeypatch, source: Path, temporaryPath: Path) -> types.SimpleNamespace:
    """Put the stand-ins and Slicer's own Python in place; ``monkeypatch`` undoes all of it."""
    import slicer

    monkeypatch.setitem(sys.modules, "qt", qtModule())
    monkeypatch.setitem(sys.modules, "ctk", ctkModule())
    monkeypatch.setattr(slicer, "__path__", [*slicer.__path__, str(slicerSourcePython(source))])
    for name, cls in SLICER_WIDGETS.items():
        monkeypatch.setattr(slicer, name, cls, raising=False)
    for name in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLSubjectHierarchyTreeView",
                 "qMRMLSubjectHierarchyComboBox", "qMRMLScreenShotDialog"):
        monkeypatch.setattr(slicer, name, standInClass(name), raising=False)
    app = StandInApplication(temporaryPath, lambda: slicer.mrmlScene)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
    # what needs the main window or the views: recorded, not shown
    shown = types.SimpleNamespace(errors=[], confirmations=[], status=[], layers=[], delays=[], restarts=[])
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: shown.errors.append(text))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, *a, **k: shown.confirmations.append(text) or True)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay",
                        lambda text, *a, **k: shown.confirmations.append(text) or True)
    monkeypatch.setattr(slicer.util, "restart", lambda: shown.restarts.append(True))
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda text, *a, **k: shown.status.append(text))
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda *a, **k: shown.layers.append(k))
    monkeypatch.setattr(slicer.util, "delayDisplay", lambda text, *a, **k: shown.delays.append(text))
    monkeypatch.setattr(slicer.util, "reloadScriptedModule", lambda name: None)
    QTimer.pending.clear()
    QTimer.running.clear()
    QDesktopServices.opened.clear()
    return types.SimpleNamespace(app=app, shown=shown)
