"""Output folders that appear complete or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_files(output_dir: str | Path, replaces: tuple = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``output_dir``; on success its files move into ``output_dir``, and
    the files named in ``replaces`` that this run did not write are removed from it (the folder holds
    one whole set). The move holds a lock on the folder, so that two runs finishing at once leave one
    run's set, not a mix (with slow renames one folder held one run's metrics.json and the other's
    transform.h5).

    On any error the temporary folder is removed and ``output_dir`` is left as it was.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{output_dir.name}.partial-"
    remove_stale(output_dir.parent, prefix, "-")
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=output_dir.parent))
    try:
        yield stage
        with folder_lock(output_dir):
            output_dir.mkdir(exist_ok=True)
            written = {item.name for item in stage.iterdir()}
            for name in set(replaces) - written:
                (output_dir / name).unlink(missing_ok=True)
            for item in stage.iterdir():
                os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder``'s outputs while they are moved into place: a lock file beside it
    (``.<name>.lock``, left for the next run), flock on POSIX, msvcrt's byte lock on Windows."""
    path = folder.parent / f".{folder.name}.lock"
    with open(path, "a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        yield


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; True when that cannot be told (nothing of a live run is removed)."""
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:  # os.kill(pid, 0) would send Ctrl-C on Windows
        import psutil
    except ImportError:
        return True
    return psutil.pid_exists(pid)


def remove_stale(folder: str | Path, prefix: str, end: str) -> list[Path]:
    """Remove the temporaries ``<prefix><pid><end>...`` in ``folder`` that a killed process left behind
    (SIGKILL skips every clean-up); those of running processes stay."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        rest = item.name[len(prefix):] if item.name.startswith(prefix) else ""
        pid = rest.split(end, 1)[0]
        if pid.isdigit() and end in rest and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
            removed.append(item)
    return removed


@contextlib.contextmanager
def replacing(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` (``.<stem>.<pid>.partial<suffix>``) to write to; renamed onto
    ``path`` when the block succeeds, removed otherwise. Temporaries of killed processes go first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    stem = f".{name[:len(name) - len(suffix)] or 'image'}."
    remove_stale(path.parent, stem, f".partial{suffix}")
    tmp = path.with_name(f"{stem}{os.getpid()}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OutputError(RuntimeError):
    """An output that could not be written whole, naming the file and the cause."""


def write_cause(path: Path, error: BaseException | None = None) -> str:
    """Why writing ``path`` failed, in a user's terms: a full disk, a file size limit, or the error."""
    import errno

    code = getattr(error, "errno", None)
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), path.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < (1 << 20)):
        return f"the disk is full ({(free or 0) >> 20} MB free in {folder})"
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        limit = -1
    size = path.stat().st_size if path.exists() else 0
    if code == errno.EFBIG or (limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)) and size >= limit):
        return f"the file size limit was reached (ulimit -f: {limit // 1024} KB)"
    if error is None:
        return "the writer stopped early without saying why"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


@contextlib.contextmanager
def writing(path: Path, shown: Path | None = None) -> Iterator[Path]:
    """Write one output file at ``path``: the C libraries' messages are held back, a failure names the
    file (``shown``: its final name, when ``path`` is a temporary one) and the cause, and a file left cut
    short by a writer that reports nothing (SimpleITK's NIfTI writer on a full disk) is caught."""
    from . import stderr
    from .volumes import nifti_size_problem

    shown = shown or path
    try:
        with stderr.held():
            yield path
    except (RuntimeError, OSError) as e:
        raise OutputError(f"{shown}: could not be written: {write_cause(path, e)}") from None
    problem = nifti_size_problem(path)
    if problem:
        raise OutputError(f"{shown}: could not be written whole ({problem.split(':')[0]}): {write_cause(path)}")


def write_image(image, path: str | Path) -> Path:
    """sitk.WriteImage to a temporary name with the same extension, compressed (a .nrrd or .mha label
    map is otherwise 300x its .nii.gz), checked, then renamed into place."""
    import SimpleITK as sitk

    path = Path(path)
    suffix = "".join(s for s in path.suffixes if s.lower() in (".nii", ".gz", ".nrrd", ".mha", ".mhd", ".seg")) \
        or path.suffix
    with replacing(path, suffix) as tmp, writing(tmp, path):
        sitk.WriteImage(image, str(tmp), True)
    return path


def write_stored_gzip(image, path: str | Path) -> Path:
    """sitk.WriteImage of a float field to ``path`` (a .nii.gz) as a gzip that stores the bytes instead of
    deflating them: a displacement field's float noise barely compresses (12.8 -> 11.7 MB for a 2 mm
    head) and deflating it took 0.36 s of a 6 s registration, against 0.04 s stored. Any NIfTI reader
    takes it (it is a gzip like any other)."""
    import gzip

    import SimpleITK as sitk

    path = Path(path)
    raw = path.with_name(f".{path.name}.{os.getpid()}.raw.nii")
    try:
        sitk.WriteImage(image, str(raw))
        with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=0) as target:
            shutil.copyfileobj(source, target, 1 << 22)
    finally:
        raw.unlink(missing_ok=True)
    return path


def write_image_folder(images: dict, folder: str | Path) -> Path:
    """Images ({file name: image}) into ``folder``, which appears with all of them or is left as it was."""
    import SimpleITK as sitk

    folder = Path(folder)
    with staged_files(folder) as stage:
        for name, image in images.items():
            with writing(stage / name, folder / name) as path:
                sitk.WriteImage(image, str(path))
    return folder


def write_text(text: str, path: str | Path) -> Path:
    """A small text file written whole or not at all (temporary name, then rename)."""
    path = Path(path)
    with replacing(path) as tmp, writing(tmp, path):
        tmp.write_text(text)
    return path


def write_csv(rows: list[dict], columns: list[str], path: str | Path) -> Path:
    """A CSV table (``columns``; other keys left out, missing ones empty) written whole or not at all."""
    import csv
    import io

    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(table.getvalue(), path)


def check_image_output(path: str | Path, inputs: tuple = ()) -> Path:
    """Refuse, before any work, an output image path with a non-3D format (a .png would hold one
    slice), in a folder that cannot be written, or that is one of the ``inputs`` (which it would
    overwrite)."""
    from .volumes import IMAGE_SUFFIXES

    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{path}: the output needs a 3D image format: {', '.join(IMAGE_SUFFIXES)} "
                         "(.seg.nrrd too)")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name for the output")
    check_not_an_input(path, inputs)
    check_output_folder(path.parent)
    return path


def check_output_folder(folder: str | Path, inputs: tuple = (), names: tuple = ()) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or written, or
    whose output ``names`` would overwrite one of the ``inputs``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file, not a folder for the outputs")
    dangling = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise ValueError(f"{folder}: {dangling} is a link to {os.readlink(dangling)}, which does not exist")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not _can_write_in(existing):
        raise ValueError(f"{folder}: cannot be written (no permission to create or write in {existing}, or it is "
                         "on a read-only file system)")
    for name in names:
        check_not_an_input(folder / name, inputs)
    return folder


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, tried rather than read off its permission bits (which
    say nothing of a read-only file system, nor of what root may do)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        handle, probe = tempfile.mkstemp(prefix=".gvsl-write-probe-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(probe)
    return True


def check_not_an_input(path: Path, inputs: tuple) -> None:
    target = Path(path).resolve()
    for given in inputs:
        if given and Path(given).resolve() == target:
            raise ValueError(f"{path}: is also an input; writing the output there would overwrite it")
