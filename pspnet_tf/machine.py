"""What machine this is, for benchmark tables: the CPU, its ISA features, oneDNN on or off.

Reads only; changes nothing. Whether TensorFlow uses oneDNN is TensorFlow's choice (on by
default only on CPUs with AVX512-VNNI, AVX512-BF16 or AMX) or the user's
(``TF_ENABLE_ONEDNN_OPTS=0|1``, read once, when TensorFlow loads); the README's
performance section says when each setting helps.

- :func:`cpu_model`, :func:`isa_features`, :func:`describe`: the CPU and the ISA features
  that decide which kernels exist (avx2, fma, avx512f, avx512_bf16, amx).
- :func:`onednn_enabled`: whether this TensorFlow process runs oneDNN kernels (asked of
  TensorFlow itself, not guessed from the platform).
"""

from __future__ import annotations

import functools
import os
import platform

# The CPU features that decide which kernels TF and oneDNN have here.
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# TensorFlow >= 2.9 turns oneDNN on by default only where one of these is present
# (tensorflow/core/util/util.cc, IsMKLEnabled); everywhere else on x86 it is off.
_ONEDNN_BY_DEFAULT = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


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
