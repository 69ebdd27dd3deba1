"""Writing files so that a kill never leaves a half-written one under its final name.

Every writer in the package (models, backups, reports, images, videos, caches) goes
through :func:`atomic_path`: it hands out a hidden temporary name in the target's folder
and renames it over the target only when the block finishes without an exception.
:func:`remove_stale_temporaries` deletes the temporaries a killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

# ".{stem}.tmp{pid}{suffix}": the pid tells whether the writer is still alive.
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.weights\.h5|\.[^.]*)?$")
# Suffixes kept whole: Keras' save_weights accepts only names ending in ".weights.h5".
_COMPOUND_SUFFIXES = (".weights.h5",)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path``; renames it to ``path`` on success.

    On an exception the temporary file or folder is removed and ``path`` is left as it
    was. The suffix is kept, so writers that choose a format from it still work. An
    existing folder at ``path`` is replaced.

    Args:
        path: str or path-like. The file or folder to write.

    Yields:
        str. The temporary path to write to.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, suffix = _split_suffix(os.path.basename(path))
    temporary = os.path.join(directory, f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        yield temporary
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        _remove(temporary)


def _split_suffix(name):
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return os.path.splitext(name)


def write_text(path, text):
    """Writes ``text`` to ``path`` atomically; returns the path as a str."""
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        file.write(text)
    return os.fspath(path)


def write_json(path, data, indent=2):
    """Writes ``data`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def remove_stale_temporaries(directory):
    """Deletes :func:`atomic_path` temporaries in ``directory`` whose writer is gone.

    Args:
        directory: str. The folder to clean (not recursive); a missing one is fine.

    Returns:
        list of str, the paths removed.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(name)
        if match and not _alive(int(match.group(1))):
            path = os.path.join(directory, name)
            _remove(path)
            removed.append(path)
    return removed


def _alive(pid):
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
