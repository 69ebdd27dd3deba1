"""The kernel trials' cache: one JSON file, a record per machine and trial.

:mod:`pspnet_tf.autotune` times kernels once per machine, layer shape and TF version and
keeps the results here, in ``~/.cache/pspnet_tf/kernels.json`` (``$XDG_CACHE_HOME``, or
the folder ``PSPNET_TF_CACHE_DIR`` names). The file is written atomically; an unreadable
one is reported and replaced.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import keras
import tensorflow as tf

from pspnet_tf import machine
from pspnet_tf.files import write_text

log = logging.getLogger("pspnet_tf")

CACHE_VARIABLE = "PSPNET_TF_CACHE_DIR"


def cache_path():
    """The trial cache file (``PSPNET_TF_CACHE_DIR``, else ``$XDG_CACHE_HOME/pspnet_tf``)."""
    folder = os.environ.get(CACHE_VARIABLE)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "pspnet_tf")
    return os.path.join(folder, "kernels.json")


@functools.lru_cache(maxsize=1)
def machine_key():
    """What the trials' timings depend on: CPU, ISA, oneDNN, devices, threads, versions."""
    gpus = [
        tf.config.experimental.get_device_details(d).get("device_name", d.name)
        for d in tf.config.list_physical_devices("GPU")
    ]
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS") or (
        tf.config.threading.get_intra_op_parallelism_threads() or len(os.sched_getaffinity(0))
    )
    isa_limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "")  # emulating another CPU class
    return (
        f"{machine.cpu_model()} [{' '.join(machine.isa_features())}] "
        f"onednn={'on' if machine.onednn_enabled() else 'off'}{isa_limit} gpus={gpus} "
        f"threads={threads} "
        f"tf={tf.__version__} keras={keras.__version__}"
    )


memory = {}  # cache path -> {machine key: {trial key: record}}


def load(path=None):
    """This machine's records (``{trial key: record}``) in the cache at ``path``."""
    path = path or cache_path()
    if path not in memory:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as error:
            log.warning("kernel trial cache %s is unreadable (%s): starting a new one", path, error)
            data = {}
        memory[path] = data
    return memory[path].setdefault(machine_key(), {})


def store(key, record):
    """Records one trial for this machine; the file is rewritten atomically."""
    path = cache_path()
    load(path)[key] = record
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps(memory[path], indent=1, sort_keys=True))
    except OSError as error:
        log.warning("cannot write the kernel trial cache %s (%s): kept in memory", path, error)
