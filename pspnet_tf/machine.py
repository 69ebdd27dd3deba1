"""What machine this is, and the TensorFlow start-up settings chosen for it.

Imports only the standard library at module level: :func:`prepare_tensorflow` must run
before TensorFlow is imported (``pspnet_tf/__init__.py`` calls it first), because
``TF_ENABLE_ONEDNN_OPTS`` is read once, when TensorFlow loads.

- :func:`cpu_model`, :func:`isa_features`, :func:`describe`: the CPU and the ISA features
  that decide which kernels exist (avx2, fma, avx512f, avx512_bf16, amx), for benchmark
  tables and the kernel trial's cache key.
- :func:`onednn_enabled`: whether this TensorFlow process runs oneDNN kernels (asked of
  TensorFlow itself, not guessed from the platform).
- :func:`prepare_tensorflow`: oneDNN on where TensorFlow would leave it off (x86 CPUs
  without AVX512-VNNI, AVX512-BF16 or AMX), unless the user set ``TF_ENABLE_ONEDNN_OPTS``;
  for the command line also TensorFlow's start-up log lines silenced.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import sys
import tempfile

log = logging.getLogger("pspnet_tf")

# The CPU features that decide which kernels TF and oneDNN have here.
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# TensorFlow >= 2.9 turns oneDNN on by default only where one of these is present
# (tensorflow/core/util/util.cc, IsMKLEnabled); everywhere else on x86 it is off.
_ONEDNN_BY_DEFAULT = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# Why oneDNN is turned on where TF leaves it off (benchmarks/NOTES.md, "oneDNN on AVX2"):
# on AVX2-only CPUs the training steps of both backbones ran faster with it.
_ONEDNN_REASON = "faster training steps measured on AVX2-only CPUs"


@functools.lru_cache(maxsize=1)
def _cpuinfo():
    """``(model name, set of flags)`` from ``/proc/cpuinfo``, or ``("", set())`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown CPU"


def isa_features():
    """The :data:`ISA_FEATURES` this CPU has, in that order (empty where unknown)."""
    flags = _cpuinfo()[1]
    return [name for name in ISA_FEATURES if name in flags]


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def onednn_default():
    """Whether TensorFlow turns oneDNN on by itself on this CPU (None: cannot tell)."""
    if not is_x86():
        return None
    flags = _cpuinfo()[1]
    if not flags:
        return None
    return any(name in flags for name in _ONEDNN_BY_DEFAULT)


def onednn_enabled():
    """Whether this process's TensorFlow runs its oneDNN CPU kernels (imports TensorFlow)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # private: no public API
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def describe():
    """One line: CPU model, ISA features, oneDNN on or off and why (imports TensorFlow)."""
    features = " ".join(isa_features()) or "ISA features unknown"
    default = {True: "on", False: "off", None: "unknown"}[onednn_default()]
    setting = os.environ.get(ONEDNN_VARIABLE, "unset")
    state = "on" if onednn_enabled() else "off"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limit = f", limited to {limit} by ONEDNN_MAX_CPU_ISA" if limit else ""
    return (
        f"{cpu_model()} ({features}), oneDNN {state}{limit} "
        f"({ONEDNN_VARIABLE}={setting}, TF default {default})"
    )


_notes = []


def startup_notes():
    """What :func:`prepare_tensorflow` changed, one line each (for the CLI to print)."""
    return list(_notes)


def running_cli():
    """Whether this process is the ``pspnet-tf`` command (or ``python -m pspnet_tf``)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("pspnet-tf", "pspnet-tf.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return "-m" in orig and orig[orig.index("-m") + 1 :][:1] in (["pspnet_tf"], ["pspnet_tf.cli"])


def prepare_tensorflow():
    """Start-up settings that TensorFlow reads once; does nothing once it is imported.

    - Where TensorFlow would leave oneDNN off (x86 CPUs without AVX512-VNNI, AVX512-BF16
      or AMX) and ``TF_ENABLE_ONEDNN_OPTS`` is unset, sets it to 1 and logs one line.
      Set the variable (0 or 1) to decide yourself.
    - In the command line, unless ``TF_CPP_MIN_LOG_LEVEL`` is set: TensorFlow's start-up
      lines (CUDA stub, cpu_feature_guard, oneDNN notice, absl) are silenced.
    """
    if "tensorflow" in sys.modules:
        return
    if os.environ.get(ONEDNN_VARIABLE) is None and onednn_default() is False:
        os.environ[ONEDNN_VARIABLE] = "1"
        note = (
            f"oneDNN turned on ({ONEDNN_VARIABLE}=1; TensorFlow leaves it off on this CPU; "
            f"{_ONEDNN_REASON}); set {ONEDNN_VARIABLE}=0 to keep it off"
        )
        _notes.append(note)
        log.info(note)
    if running_cli() and os.environ.get("TF_CPP_MIN_LOG_LEVEL") is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        with _stderr_silenced():
            import tensorflow  # noqa: F401  (its start-up lines go nowhere)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 into a temporary file for the block; replayed if the block fails.

    TensorFlow writes its first log lines from C++ before absl logging is set up, where
    ``TF_CPP_MIN_LOG_LEVEL`` does not reach them.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
