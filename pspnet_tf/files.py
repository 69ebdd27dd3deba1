"""Writing files so that a kill never leaves a half-written one under its final name,
and nothing the user owns is replaced.

Every writer in the package (models, backups, reports, images, videos, caches) goes
through :func:`atomic_path`: it hands out a hidden temporary name in the target's folder
and renames it over the target only when the block finishes without an exception.

The output-path rule: a writer replaces only what it wrote itself. Each writer names the
:class:`OutputKind` it writes; an existing target is replaced only if that kind
recognises it by its contents (a previous SavedModel export, a TFLite file, a PNG); any
other file or folder is refused with :class:`OutputExistsError`, one line naming it.
A replaced folder is moved aside and deleted only after the new one is in place.

:func:`remove_stale_temporaries` deletes the temporaries a killed process left behind;
:func:`atomic_path` does so for its own target's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable

# ".{stem}.tmp{pid}{suffix}": the pid tells whether the writer is still alive.
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.weights\.h5|\.[^.]*)?$")
# Suffixes kept whole: Keras' save_weights accepts only names ending in ".weights.h5".
_COMPOUND_SUFFIXES = (".weights.h5",)


class OutputExistsError(FileExistsError):
    """An output path holds something this writer did not write; the message names it."""


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What a writer writes, so that an output of its own can be told from the user's.

    Attributes:
        description: str. Said in the error, e.g. ``"a SavedModel folder"``.
        recognise: callable ``(path) -> bool``: whether the existing ``path`` is a
            previous output of this kind (and so may be replaced).
    """

    description: str
    recognise: Callable[[str], bool]


def file_kind(description, *magics):
    """An :class:`OutputKind` for a file that starts with one of the bytes ``magics``."""

    def recognise(path):
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as file:
            head = file.read(16)
        return any(head.startswith(magic) for magic in magics)

    return OutputKind(description, recognise)


def _is_keras_file(path):
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return "config.json" in archive.namelist()


def _is_json_object(path):
    try:
        with open(path) as file:
            return isinstance(json.load(file), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _is_video(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        head = file.read(12)
    return head[4:8] == b"ftyp" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


def is_empty_folder(path):
    """Whether ``path`` is a folder with nothing in it."""
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


# A file of any kind: for files inside folders the package owns (run folders, caches).
ANY_FILE = OutputKind("a file", os.path.isfile)
PNG = file_kind("a PNG image", b"\x89PNG\r\n\x1a\n")
JPEG = file_kind("a JPEG image", b"\xff\xd8\xff")
KERAS_MODEL = OutputKind("a .keras model", _is_keras_file)
JSON_OBJECT = OutputKind("a JSON file", _is_json_object)
VIDEO = OutputKind("an MP4 or AVI video", _is_video)
# A folder the writer adds files to (and never deletes): any existing folder will do.
FOLDER = OutputKind("a folder", os.path.isdir)


def folder_kind(description, *markers):
    """An :class:`OutputKind` for a folder: empty, or holding one of ``markers`` (paths
    relative to it) that only its writer puts there."""

    def recognise(path):
        if not os.path.isdir(path) or os.path.islink(path):
            return False
        return is_empty_folder(path) or any(os.path.exists(os.path.join(path, m)) for m in markers)

    return OutputKind(description, recognise)


def check_output(path, kind=ANY_FILE):
    """Refuses an output path that holds something ``kind`` does not recognise.

    Call it before slow work (loading a model, training) so a bad path fails first;
    :func:`atomic_path` calls it again before it writes.

    Args:
        path: str or path-like. The file or folder to be written.
        kind: :class:`OutputKind`. What the writer writes.

    Raises:
        OutputExistsError: ``path`` exists and is not recognised as ``kind``, or one of
            its parent folders is a file; the message names the path.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise OutputExistsError(f"{path}: cannot be written, {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot be written, {parent} is read-only")
    if not os.path.lexists(path) or kind.recognise(path):
        return
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        what = f"a folder holding {shown}" if entries else "an empty folder"
    else:
        what = "a file"
    raise OutputExistsError(
        f"{path}: exists ({what}) and is not {kind.description}; refusing to replace "
        "it: choose another path, or remove it yourself"
    )


@contextlib.contextmanager
def atomic_path(path, kind=ANY_FILE):
    """Yields a temporary path next to ``path``; renames it to ``path`` on success.

    On an exception the temporary file or folder is removed and ``path`` is left as it
    was. The suffix is kept, so writers that choose a format from it still work. An
    existing ``path`` is replaced only if ``kind`` recognises it (:func:`check_output`),
    and stays in place until the new one is complete. Temporaries a killed writer of the
    same path left behind are removed first.

    Args:
        path: str or path-like. The file or folder to write.
        kind: :class:`OutputKind`. What is written; decides what may be replaced.
            Defaults to :data:`ANY_FILE`.

    Yields:
        str. The temporary path to write to.

    Raises:
        OutputExistsError: ``path`` holds something else (see :func:`check_output`).
    """
    path = os.path.abspath(os.fspath(path))
    check_output(path, kind)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    stem, suffix = _split_suffix(os.path.basename(path))
    remove_stale_temporaries(directory, stem=stem)
    temporary = os.path.join(directory, f".{stem}.tmp{os.getpid()}{suffix}")
    aside = os.path.join(directory, f".{stem}.tmp{os.getpid()}.old")
    try:
        try:
            yield temporary
        except Exception as error:
            if _disk_full(error):  # h5py, TensorFlow and the OS each say it their own way
                raise no_space(path) from error
            raise
        check_output(path, kind)  # the writer may have taken long: look again
        if os.path.isdir(path) and not os.path.islink(path):
            os.replace(path, aside)  # the old folder stays whole until the new one is in
        os.replace(temporary, path)
    finally:
        _remove(temporary)
        _remove(aside)


def _disk_full(error):
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)


def _existing_folder(path):
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


def free_bytes(path):
    """Free bytes on the device a file at ``path`` would be written to."""
    return shutil.disk_usage(_existing_folder(path)).free


def no_space(path, needed=None):
    """The one-line OSError (ENOSPC) for a write to ``path`` that did not fit."""
    directory = _existing_folder(path)
    free = shutil.disk_usage(directory).free / 2**20
    need = f"needs about {needed / 2**20:.0f} MB, " if needed else ""
    error = OSError(f"{path}: no space left on the device ({need}{free:.0f} MB free in "
                    f"{directory}); free some space and run the same command again")  # fmt: skip
    error.errno = errno.ENOSPC
    return error


def _split_suffix(name):
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return os.path.splitext(name)


def write_text(path, text, kind=ANY_FILE):
    """Writes ``text`` to ``path`` atomically; returns the path as a str."""
    with atomic_path(path, kind) as temporary, open(temporary, "w") as file:
        file.write(text)
    return os.fspath(path)


def write_json(path, data, indent=2, kind=ANY_FILE):
    """Writes ``data`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n", kind)


def remove_stale_temporaries(directory, stem=None):
    """Deletes :func:`atomic_path` temporaries in ``directory`` whose writer is gone.

    Args:
        directory: str. The folder to clean (not recursive); a missing one is fine.
        stem: str or None. Only the temporaries of targets with this name (no suffix).

    Returns:
        list of str, the paths removed.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(name)
        if stem is not None and not name.startswith(f".{stem}.tmp"):
            continue
        if match and not process_alive(int(match.group(1))):
            path = os.path.join(directory, name)
            _remove(path)
            removed.append(path)
    return removed


def process_alive(pid):
    """Whether process ``pid`` exists (True where it cannot be told: left alone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (someone else's) or cannot tell: leave it alone
    return True


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
