"""A training run's folder: what a kill or a corrupt file leaves there, and what a rerun does.

``pspnet-tf train --output OUTPUT`` resumes when rerun, so the folder must survive a kill at
any moment and say what it did about anything it finds broken:

- :func:`prepare`: before the run, removes the temporaries of killed writers and checks
  ``config.yaml`` against this run's settings (a folder where no epoch finished binds to no
  settings: a corrected command just runs).
- :class:`Backup`: the resume state, written atomically with the previous one kept; a
  corrupt backup is named and the previous one used, or the run refused with the way out.
- :class:`History`: the CSV log, which never holds an epoch twice.
- :func:`keras_file_problem`: whether a ``.keras`` checkpoint is complete.

Messages about repairs are printed (stdout, with the epoch lines); refusals are
``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shlex
import shutil
import zipfile

import h5py
import keras
import yaml

from pspnet_tf.errors import one_line
from pspnet_tf.files import (
    atomic_path,
    check_output,
    folder_kind,
    free_bytes,
    no_space,
    process_alive,
    remove_stale_temporaries,
    write_json,
    write_text,
)

BACKUP_DIR = "backup"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"  # the pid of the train writing into the folder
# A run folder is empty or holds the lock or the config.yaml that train writes first.
RUN_FOLDER = folder_kind("a run folder (it has no config.yaml)", CONFIG_FILE, LOCK_FILE)
WEIGHTS_FILE = "latest.weights.h5"  # Keras' BackupAndRestore names, kept for tools reading them
METADATA_FILE = "training_metadata.json"
# Stored inside each backup, so that its weights and its epoch cannot disagree.
EPOCH_ATTRIBUTE = "pspnet_tf_epoch"


def note(message):
    """Says what was found and done in the run folder (printed with the epoch lines)."""
    print(message, flush=True)


def start_again(output):
    """The way out of a run that cannot resume: what to delete, or where else to write."""
    return (
        f"to start the run again, delete the folder (rm -r {shlex.quote(os.fspath(output))}) and "
        "rerun the same command, or give another --output"
    )


class RunFolderBusy(OSError):
    """Another process is training into the same run folder."""


@contextlib.contextmanager
def locked(output):
    """Holds ``output/.lock`` (this process's pid) for the block.

    A second ``train`` into the same folder while the first runs would train the same
    epochs over the same files; it is refused instead. A lock whose process is gone (a
    killed run) is taken over.

    Raises:
        RunFolderBusy: a live process holds the lock; the message names its pid.
    """
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, LOCK_FILE)
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and owner != os.getpid() and process_alive(owner):
                raise RunFolderBusy(
                    f"{output}: another pspnet-tf train (pid {owner}) is writing to this run "
                    "folder; wait for it to finish, or stop it and rerun"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # its process is gone
    with os.fdopen(descriptor, "w") as file:
        file.write(str(os.getpid()))
    try:
        yield
    finally:
        if _lock_owner(path) == os.getpid():
            os.remove(path)


def _lock_owner(path):
    try:
        with open(path) as file:
            return int(file.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def finished_epochs(output):
    """The epochs the run in ``output`` has finished, by its backup (0: none)."""
    return _recorded_epoch(os.path.join(output, BACKUP_DIR, METADATA_FILE))


def has_finished_epoch(output):
    """True if ``output`` holds the backup of at least one finished epoch."""
    backup = os.path.join(output, BACKUP_DIR)
    return any(
        os.path.exists(os.path.join(backup, n)) for n in (WEIGHTS_FILE, WEIGHTS_FILE + ".bkp")
    )


def prepare(output, config, *, write=True, resumable_changes=()):
    """Cleans ``output`` of a killed run's temporaries, checks and writes ``config.yaml``.

    Writes (``write=True``) on the chief only, as temporaries are told apart by the
    writer's pid, which only means something on the machine that wrote them; and only
    after every check of the config and data has passed: it is the first write into
    ``output``. ``write=False`` only compares, reading nothing but ``config.yaml``.

    Args:
        output: str. The run folder (created if missing).
        config: dict. The resolved training config.
        write: bool. False (a worker other than the chief): only compare.
        resumable_changes: keys that may differ from the saved config.

    Raises:
        ValueError: naming ``config.yaml``, if it is corrupt or holds other settings and
            the folder holds a finished epoch to resume.
        pspnet_tf.files.OutputExistsError: ``output`` is a file, or a folder of other
            things (neither empty nor a run folder).
    """
    check_output(output, RUN_FOLDER)
    folders = (output, os.path.join(output, BACKUP_DIR), os.path.join(output, CHECKPOINT_DIR))
    for folder in folders if write else ():
        for path in remove_stale_temporaries(folder):
            note(f"removed {path}: a temporary file of a killed run")
    path = os.path.join(output, CONFIG_FILE)
    saved = _read_saved_config(path, output, write)
    if saved is not None:
        changed = sorted(
            key
            for key in set(saved) | set(config)
            if key not in resumable_changes and saved.get(key) != config.get(key)
        )
        if changed and has_finished_epoch(output):
            raise ValueError(
                f"{path} holds a run with other settings ({', '.join(changed)}): "
                "use another output folder, or delete this one to start again"
            )
        if changed and write:
            note(
                f"{path}: replaced; no epoch had finished with its settings ({', '.join(changed)})"
            )
    if write:
        write_text(path, yaml.safe_dump(config, sort_keys=False))


def _read_saved_config(path, output, write):
    """The saved config dict, None if there is none (or a corrupt one with nothing to resume)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            saved = yaml.safe_load(file)
        if not isinstance(saved, dict):
            raise ValueError("not a mapping of keys to values")
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as error:
        problem = f"{path}: corrupt run config ({one_line(error)})"
        if has_finished_epoch(output):
            raise ValueError(f"{problem}; cannot tell which settings to resume; "
                             f"{start_again(output)}") from None  # fmt: skip
        if write:
            note(f"{problem}: replaced; no epoch had finished")
        return None
    return saved


def keras_file_problem(path):
    """None if ``path`` is a complete ``.keras`` archive, else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a complete .keras file ({one_line(error)})"
    if damaged:
        return f"damaged member {damaged}"
    if "config.json" not in names:
        return "no config.json inside"
    return None


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' ``BackupAndRestore`` (weights, optimizer state, epoch) made safe to kill.

    Keras' own writes ``latest.weights.h5`` in place and copies the previous one aside:
    a kill during the write leaves a truncated file that every rerun fails on with an h5py
    error naming no file, and its fallback to the copy is silent. Here each backup goes to
    a temporary that is renamed over ``latest.weights.h5`` after the previous one was
    renamed to ``latest.weights.h5.bkp``, the epoch is stored inside the weights file, and
    a restore names any corrupt backup and what it did (used the previous one, or refused
    with the way to start again). ``training_metadata.json`` is kept for Keras' layout.

    Args:
        backup_dir: str. The folder of the backups.
    """

    def __init__(self, backup_dir):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)

    def on_train_begin(self, logs=None):
        epoch = self.restore()
        # What Keras' BackupAndRestore sets too: fit starts at this epoch.
        self.model._initial_epoch = epoch or None

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self.save(epoch + 1)

    def save(self, epoch):
        """Writes the model's weights and optimizer state as the backup after ``epoch`` epochs.

        Raises:
            OSError: (ENOSPC) the disk has no room for it, checked first: h5py crashed the
                process (a segmentation fault) on a full disk. The previous backup stays.
        """
        needed = self._backup_bytes()
        if free_bytes(self._weights_path) < needed:
            raise no_space(self._weights_path, needed)
        with atomic_path(self._weights_path) as temporary:
            self.model.save_weights(temporary)
            with h5py.File(temporary, "a") as file:
                file.attrs[EPOCH_ATTRIBUTE] = int(epoch)
            if os.path.exists(self._weights_path):
                os.replace(self._weights_path, self._prev_weights_path)
        write_json(self._training_metadata_path, {"epoch": int(epoch), "batch": 0})

    def _backup_bytes(self):
        """About what a backup takes: the last one's size, else the variables' bytes (the
        weights and the optimizer's slots), with a margin for HDF5's own records."""
        if os.path.isfile(self._weights_path):
            size = os.path.getsize(self._weights_path)
        else:
            variables = self.model.weights + list(getattr(self.model.optimizer, "variables", []))
            size = sum(4 * math.prod(v.shape) for v in variables)  # float32
        return int(size * 1.1) + 2**20

    def restore(self):
        """Loads the newest readable backup into the model.

        Returns:
            int, the epochs that backup finished (0: none, the run starts).

        Raises:
            ValueError: naming the files, if backups exist, an epoch is recorded and none
                can be read.
        """
        problems = []
        if not os.path.exists(self._weights_path) and os.path.exists(self._prev_weights_path):
            problems.append(f"{self._weights_path}: missing (killed while replacing it)")
        for path, metadata in (
            (self._weights_path, self._training_metadata_path),
            (self._prev_weights_path, self._prev_training_metadata_path),
        ):
            if not os.path.exists(path):
                continue
            try:
                epoch = self._load(path, metadata)
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
                problems.append(f"{path}: corrupt backup ({one_line(error)})")
                continue
            if problems:
                write_json(self._training_metadata_path, {"epoch": epoch, "batch": 0})
                note(f"{problems[0]}; resumed from {path} (after epoch {epoch}): "
                     f"epoch {epoch + 1} runs again")  # fmt: skip
            return epoch
        return self._nothing_to_restore(problems)

    def _load(self, path, metadata):
        """Loads ``path`` (the previous backup through a copy over the latest, as Keras'
        ``load_weights`` reads only ``.weights.h5`` names); returns its epoch."""
        with h5py.File(path, "r") as file:
            epoch = file.attrs.get(EPOCH_ATTRIBUTE)
        if epoch is None:  # written by Keras' own callback
            with open(metadata) as file:
                epoch = json.load(file)["epoch"]
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        if path == self._weights_path:
            self.model.load_weights(path)
        else:
            with atomic_path(self._weights_path) as temporary:
                shutil.copyfile(path, temporary)
                self.model.load_weights(temporary)
        return int(epoch)

    def _nothing_to_restore(self, problems):
        if not problems:
            return 0
        output = os.path.dirname(os.path.abspath(self.backup_dir))
        if _recorded_epoch(self._training_metadata_path):
            raise ValueError(f"{'; '.join(problems)}; no readable backup to resume from; "
                             f"{start_again(output)}")  # fmt: skip
        # Keras' callback killed while writing its first backup: no epoch ever finished.
        for path in (self._weights_path, self._prev_weights_path):
            if os.path.exists(path):
                os.remove(path)
        note(f"{problems[0]}: removed, the first backup was never finished; starting at epoch 1")
        return 0


def _recorded_epoch(metadata):
    try:
        with open(metadata) as file:
            return int(json.load(file).get("epoch") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


class History(keras.callbacks.CSVLogger):
    """``CSVLogger`` appending to ``history.csv``, which never holds an epoch twice.

    A resumed run repeats the epochs after its backup (a kill between the log and the
    backup, or a restore from the previous backup); their old rows are dropped (and said
    so) before the first new row is written.

    Args:
        filename: str. The CSV file.
    """

    def __init__(self, filename):
        super().__init__(filename, append=True)
        self._opened = False

    def on_train_begin(self, logs=None):
        self._opened = False  # opened at the first epoch's end, once it says where fit started

    def on_epoch_end(self, epoch, logs=None):
        if not self._opened:
            self.drop_rows_from(epoch)
            super().on_train_begin()
            self._opened = True
        super().on_epoch_end(epoch, logs)

    def drop_rows_from(self, epoch):
        """Rewrites the file without the rows of epochs ``>= epoch`` (0-based) or unreadable."""
        if not os.path.isfile(self.filename):
            return
        with open(self.filename, newline="") as file:
            rows = list(csv.reader(file))
        epochs = [_epoch_of_row(row) for row in rows[1:]]
        kept = [row for row, e in zip(rows[1:], epochs, strict=True) if e is not None and e < epoch]
        if len(kept) == len(epochs):
            return
        dropped = sorted({e for e in epochs if e is not None and e >= epoch})
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows[:1] + kept)
        write_text(self.filename, text.getvalue())
        epochs = ", ".join(str(e + 1) for e in dropped) or "an unfinished row"
        note(f"{self.filename}: dropped the rows of epoch {epochs}, which run again")


def _epoch_of_row(row):
    try:
        return int(row[0])
    except (IndexError, ValueError):
        return None
