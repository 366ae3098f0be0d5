"""A slicer-core scene that behaves like the application's (shared by the Slicer test modules)."""
from __future__ import annotations

from pathlib import Path

import slicer


def new_scene(cache: Path | None = None):
    """A scene with the logics the application attaches (colours, volumes, segmentations, transforms)
    and, given a folder, its download cache; it becomes ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    for name, logic in (("Colors", slicer.vtkMRMLColorLogic()), ("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                        ("Transforms", slicer.vtkSlicerTransformLogic())):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    if cache is not None:
        manager = slicer.vtkCacheManager()
        manager.SetRemoteCacheDirectory(str(cache))
        scene.SetCacheManager(manager)
    scene._keepAlive = app  # the application logic lives as long as the scene
    slicer.mrmlScene = scene
    return scene


def close_scene(scene) -> None:
    scene.Clear(True)
    if getattr(slicer, "mrmlScene", None) is scene:
        del slicer.mrmlScene


def load_volume(scene, path: Path, name: str, labelmap: bool = False):
    """What File > Add Data does: a storage node reads the file into a new volume node."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
