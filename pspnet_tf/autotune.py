"""Fast kernels chosen where the model runs: probe that each runs here, time it, keep winners.

A model holds only standard Keras layers (a file made on one machine runs on any
other). This module makes it fast on the machine at hand, the way cuDNN's benchmark
mode or XLA's autotuning do:

1. **Probe** (once per process): each kernel of :mod:`pspnet_tf.kernels` runs on a
   tiny input (with its gradient, for training) and must match the layer's own call to
   1e-4; a kernel that raises (TF's CPU kernels without oneDNN reject dilation, for
   example) or differs is never used.
2. **Trial** (once per machine, layer shape and TF version; cached in
   ``~/.cache/pspnet_tf/kernels.json``): the kernel and the layer's own call are timed
   alternately on a copy of the layer at the shape it runs at; the kernel is kept where
   it is faster. An inference copy is also timed whole against the model's own graph,
   and the faster of the two runs.

:func:`for_training` installs training kernels on a model in place (what
:func:`pspnet_tf.training.compile_for_training` calls); :func:`for_inference` returns
the copy prediction and evaluation run (BatchNorm folded where that wins, see
:mod:`pspnet_tf.inference_copy`). Neither changes what ``model.save`` or export write.

The choice: the ``kernels`` argument, else the ``PSPNET_TF_KERNELS`` variable:

- ``"auto"`` (default): probe and trial, as above.
- ``"probe"``: every kernel that runs here, no timing.
- ``"off"``: none; the model's own graph (Keras' layers, BatchNorm not folded).
- ``"NAME=on,NAME=off,..."``: force kernels on (still only where they run) or off; the
  others as ``"auto"``. Names: :data:`CHOICE_NAMES`.

``PSPNET_TF_CACHE_DIR`` moves the trial cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from pspnet_tf import machine
from pspnet_tf.files import write_text
from pspnet_tf.inference_copy import inference_copy
from pspnet_tf.kernels import KERNEL_NAMES, KERNELS, install, installed, uninstall
from pspnet_tf.precision import resolve_precision

log = logging.getLogger("pspnet_tf")

KERNELS_VARIABLE = "PSPNET_TF_KERNELS"
CACHE_VARIABLE = "PSPNET_TF_CACHE_DIR"
MODES = ("auto", "probe", "off")
# Folding BatchNorm into the convs is decided with the kernels (by the whole-graph trial).
CHOICE_NAMES = ("fold_batch_norm", *KERNEL_NAMES)
TRIAL_RUNS = 3  # timed calls of each side after one warm-up, alternating
# A kernel must beat the layer's own call by 3%: closer results are within the noise of
# three runs on a busy 2-core machine, and the standard call is the safer default there.
_MARGIN = 0.97


@dataclasses.dataclass(frozen=True)
class Choice:
    """A parsed ``kernels`` setting: ``mode`` (one of :data:`MODES`) and forced names."""

    mode: str = "auto"
    forced: tuple = ()  # ((name, bool), ...)

    def forced_value(self, name):
        return dict(self.forced).get(name)


def parse_choice(kernels=None):
    """The :class:`Choice` for a ``kernels`` argument (None: ``PSPNET_TF_KERNELS``).

    Raises:
        ValueError: an unknown mode, kernel name or value, naming the setting.
    """
    source = "kernels" if kernels is not None else KERNELS_VARIABLE
    spec = kernels if kernels is not None else os.environ.get(KERNELS_VARIABLE, "auto")
    spec = spec.strip().lower() or "auto"
    if spec in MODES:
        return Choice(spec)
    forced = []
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        if name not in CHOICE_NAMES or value not in ("on", "off"):
            raise ValueError(
                f"{source}={spec!r}: expected one of {MODES} or NAME=on|off,... with NAME in "
                f"{CHOICE_NAMES}; got {item.strip()!r}"
            )
        forced.append((name, value == "on"))
    return Choice("auto", tuple(forced))


# ---------------------------------------------------------------- probes


def _probe_case(name, dtype):
    """A tiny layer, input shape and call arguments the kernel ``name`` computes."""
    layers = keras.layers
    if name == "fused_batch_norm":
        return layers.BatchNormalization(dtype=dtype), (2, 4, 5, 3), {"training": True}
    if name == "native_dilated_conv":
        conv = layers.Conv2D(2, 3, padding="same", dilation_rate=2, dtype=dtype)
        return conv, (1, 7, 6, 3), {}
    if name == "native_dilated_depthwise":
        conv = layers.DepthwiseConv2D(3, padding="same", dilation_rate=2, dtype=dtype)
        return conv, (1, 7, 6, 3), {}
    if name == "tap_conv":
        return layers.Conv2D(2, 3, padding="same", dtype=dtype), (1, 5, 6, 4), {}
    raise ValueError(f"no probe for kernel {name!r}")


def _twins(layer, kernel, shape):
    """Two built copies of ``layer`` with its weights, the first running ``kernel``."""
    config = layer.get_config()
    twins = [type(layer).from_config({**config, "name": f"{layer.name}_{i}"}) for i in "ab"]
    for twin in twins:
        twin.build(shape)
        twin.set_weights((layer if layer.built else twins[0]).get_weights())
    install(twins[0], kernel)
    return twins


def _outputs_and_gradients(layer, x, gradients, **kwargs):
    """``layer(x, **kwargs)`` and, if ``gradients``, those of a loss for x and the weights."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(layer(x, **kwargs), tf.float32)
        # Random upstream gradients (sum(y * y) would give BatchNorm's a zero x gradient).
        loss = tf.reduce_sum(y * tf.random.stateless_normal(tf.shape(y), seed=[7, 8]))
    if not gradients:
        return [y]
    return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]


@functools.cache
def probe(name, training, dtype="float32"):
    """Whether kernel ``name`` runs here and matches the layer's own call (and gradients).

    Args:
        name: str. One of :data:`pspnet_tf.kernels.KERNEL_NAMES`.
        training: bool. Also run and compare the gradients.
        dtype: str. The layers' dtype policy (``"mixed_bfloat16"`` computes in bfloat16,
            compared to 2e-2 instead of 1e-4).

    Returns:
        ``(ok, reason)``: bool, and a short reason where it is False.
    """
    kernel = _kernel(name)
    tolerance = 1e-4 if dtype in ("float32", "float64") else 2e-2
    try:
        layer, shape, kwargs = _probe_case(name, dtype)
        fast, own = _twins(layer, kernel, shape)
        x = tf.random.stateless_normal(shape, seed=[1, 2])
        with _quiet_tracing():
            results = [
                tf.function(lambda la=la: _outputs_and_gradients(la, x, training, **kwargs))()
                for la in (fast, own)
            ]
        for ours, reference in zip(*results, strict=True):
            ours, reference = ours.numpy(), reference.numpy()
            scale = tolerance * np.abs(reference).max()
            if not np.allclose(ours, reference, rtol=tolerance, atol=scale):
                return False, "results differ from the layer's own call"
    except Exception as error:  # noqa: BLE001  (any failure means: not on this device)
        return False, _reason(error)
    return True, ""


def _reason(error):
    """A one-line reason from an exception, without the traceback and argument lines that
    TF and Keras add to its message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    skip = ("File ", "[[", "in user code", "Traceback", "Exception encountered")
    lines = [
        re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(skip)
    ]
    message = lines[-1] if lines else ""
    name = type(error).__name__
    return message[:160] if message.startswith(name) else f"{name}: {message[:160]}"


def _kernel(name):
    return next(k for k in KERNELS if k.name == name)


# ---------------------------------------------------------------- trials and their cache


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


_memory = {}  # cache path -> {machine key: {trial key: record}}


def _load_cache(path):
    if path not in _memory:
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
        _memory[path] = data
    return _memory[path].setdefault(machine_key(), {})


def _store(key, record):
    path = cache_path()
    _load_cache(path)[key] = record
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps(_memory[path], indent=1, sort_keys=True))
    except OSError as error:
        log.warning("cannot write the kernel trial cache %s (%s): kept in memory", path, error)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pair(first, second, runs=TRIAL_RUNS):
    """Median seconds of ``first()`` and ``second()``, alternating after one warm-up each."""
    with _quiet_tracing():
        first(), second()
        times = [[], []]
        for _ in range(runs):
            times[0].append(_timed(first))
            times[1].append(_timed(second))
    return statistics.median(times[0]), statistics.median(times[1])


@contextlib.contextmanager
def _quiet_tracing():
    """Probes and trials trace new functions each: no retracing warnings from TF."""
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_log.setLevel(level)


def _cached_trial(key, measure):
    """The cached record for ``key``, else ``measure()`` -> (kernel s, own s), stored."""
    record = _load_cache(cache_path()).get(key)
    if record is None:
        kernel_s, own_s = measure()
        record = {"kernel_ms": kernel_s * 1e3, "own_ms": own_s * 1e3}
        record["keep"] = kernel_s < _MARGIN * own_s
        _store(key, record)
    return record


# The config entries that can change a layer's speed (the trial cache's key).
_SPEED_KEYS = (
    "filters", "kernel_size", "strides", "padding", "dilation_rate", "groups",
    "depth_multiplier", "use_bias", "activation", "axis", "center", "scale",
)  # fmt: skip


def _layer_trial(kernel, layer, shape, training):
    """Times ``kernel`` against the layer's own call on a fresh copy of ``layer``."""
    config = layer.get_config()
    settings = {k: config[k] for k in _SPEED_KEYS if k in config}  # not the weights' values
    settings["dtype"] = layer.dtype_policy.name
    key = json.dumps([kernel.name, "training" if training else "inference", settings, list(shape)])

    def measure():
        twins = _twins(layer, kernel, shape)
        x = tf.random.stateless_normal(shape, seed=[3, 4], dtype=tf.float32)
        x = tf.cast(x, layer.compute_dtype)
        kwargs = {"training": True} if isinstance(layer, keras.layers.BatchNormalization) else {}
        steps = [
            tf.function(lambda t=t: _total(_outputs_and_gradients(t, x, training, **kwargs)))
            for t in twins
        ]
        return time_pair(*(lambda s=s: s().numpy() for s in steps))

    return _cached_trial(key, measure)


def _total(tensors):
    """One scalar from all ``tensors`` (fetching it waits for the whole computation)."""
    return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tf.nest.flatten(tensors)])


# ---------------------------------------------------------------- choosing and installing


@dataclasses.dataclass
class Report:
    """What was chosen for one model: ``{name: (layers using it, candidates, why)}``."""

    purpose: str
    entries: dict = dataclasses.field(default_factory=dict)

    def summary(self):
        parts = []
        for name, (used, candidates, why) in self.entries.items():
            count = f"{used}/{candidates}" if candidates else ("on" if used else "off")
            parts.append(f"{name} {count}" + (f" ({why})" if why else ""))
        return f"kernels for {self.purpose}: " + ("; ".join(parts) or "none apply")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _input_shapes(model, layers, sample_shape):
    """``{layer name: input shape}`` for a model input of ``sample_shape``, or None where
    the layers are not reachable from the model's inputs (nested models)."""
    if not layers:
        return {}
    try:
        probe_model = keras.Model(model.inputs, [layer.input for layer in layers])
        spec = probe_model.compute_output_spec(
            keras.KerasTensor(sample_shape, dtype=model.inputs[0].dtype)
        )
    except (ValueError, TypeError, AttributeError):
        return None
    spec = spec if isinstance(spec, (list, tuple)) else [spec]
    return {layer.name: tuple(s.shape) for layer, s in zip(layers, spec, strict=True)}


def _sample_shape(model, sample_shape, batch_size=1):
    """A concrete model input shape: ``sample_shape``, the model's own, or 512 x 512."""
    if sample_shape is not None:
        return tuple(int(d) for d in sample_shape)
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:  # an any-size model without a sample: a typical test image size
        shape = tuple(512 if d is None else d for d in shape)
    return (batch_size, *shape)


def _policies(layers):
    return sorted({layer.dtype_policy.name for layer in layers})


def _choose(model, purpose, choice, sample_shape):
    """Installs, on ``model``'s layers, the kernels for ``purpose`` that run and win."""
    training = purpose == "training"
    report = Report(purpose)
    layers = list(_all_layers(model))
    for layer in layers:
        uninstall(layer)
    for kernel in KERNELS:
        if not (kernel.training if training else kernel.inference):
            continue
        candidates = [layer for layer in layers if kernel.applies(layer)]
        forced = choice.forced_value(kernel.name)
        if not candidates:
            continue
        if choice.mode == "off" or forced is False:
            report.entries[kernel.name] = (0, len(candidates), "turned off")
            continue
        probes = [probe(kernel.name, training, p) for p in _policies(candidates)]
        ok, why = next((result for result in probes if not result[0]), (True, ""))
        if not ok:
            report.entries[kernel.name] = (0, len(candidates), f"does not run here: {why}")
            continue
        keep, why = candidates, "not timed"
        timed = choice.mode == "auto" and forced is None
        shapes = _input_shapes(model, candidates, sample_shape) if timed else {}
        if timed and tf.distribute.has_strategy():
            why = "not timed inside a distribution strategy"  # trials would mirror variables
        elif timed and shapes is None:
            why = "not timed: layer shapes unknown"
        elif timed:
            records = [_layer_trial(kernel, la, shapes[la.name], training) for la in candidates]
            keep = [la for la, r in zip(candidates, records, strict=True) if r["keep"]]
            kernel_ms = sum(r["kernel_ms"] for r in records)
            own_ms = sum(r["own_ms"] for r in records)
            why = f"trial {own_ms / max(kernel_ms, 1e-9):.2f}x" if records else ""
        for layer in keep:
            install(layer, kernel)
        report.entries[kernel.name] = (len(keep), len(candidates), why)
    return report


def for_training(model, kernels=None, batch_size=1):
    """Installs the training kernels that run here and win on ``model``'s layers, in place.

    The model's file format and results do not change: ``model.save`` writes the
    standard layers, and each kernel gives the same outputs, gradients and moving
    statistics as the call it replaces. Call it again (e.g. with ``kernels="off"``) to
    choose anew. Trials run at ``batch_size`` and the model's input size (512 x 512
    for any-size models).

    Args:
        model: a Keras model (e.g. a PSPNet from :func:`pspnet_tf.build_pspnet`).
        kernels: str or None. See the module docstring; None reads ``PSPNET_TF_KERNELS``.
        batch_size: int. Batch of the timed trials. Defaults to 1.

    Returns:
        A :class:`Report` of what was chosen (also logged at INFO on ``pspnet_tf``).
    """
    choice = parse_choice(kernels)
    report = _choose(model, "training", choice, _sample_shape(model, None, batch_size))
    log.info(report.summary())
    return report


def for_inference(model, precision=None, kernels=None, sample_shape=None):
    """The copy of ``model`` to run for inference here, with its :class:`Report`.

    BatchNorm is folded into the convs (:func:`pspnet_tf.inference_copy.fold_batch_norm`)
    and the inference kernels that run here and win are installed; with ``"auto"``, the
    result is timed whole against the model's own graph at ``precision``, and the faster
    one is returned. Logits equal the model's own to float32 rounding.

    Args:
        model: a Keras model; functional and Sequential models get a copy, others come
            back as they are.
        precision: one of :data:`pspnet_tf.precision.PRECISIONS` or None.
        kernels: str or None. See the module docstring.
        sample_shape: ``(batch, h, w, 3)`` the trials time; defaults to the model's input
            shape (batch 1, 512 x 512 for any-size models).

    Returns:
        ``(model to call, Report)``.

    Raises:
        ValueError: an unknown ``precision`` or ``kernels``, or a reduced precision for
            a model that is not functional.
    """
    choice = parse_choice(kernels)
    resolved = resolve_precision(precision)
    report = Report("inference")
    fold = choice.mode != "off" and choice.forced_value("fold_batch_norm") is not False
    try:
        own = inference_copy(model, fold=False, precision=resolved) if resolved else model
        if not fold and choice.mode == "off":
            return own, report
        fast = inference_copy(model, fold=fold, precision=resolved)
    except ValueError:  # clone_model takes only functional and Sequential models
        if resolved not in (None, "float32"):
            raise ValueError(
                f"precision={precision!r} needs a functional Keras model; "
                f"{type(model).__name__} {model.name!r} is not one"
            ) from None
        return model, report
    shape = _sample_shape(model, sample_shape)
    report = _choose(fast, "inference", choice, shape)
    report.entries["fold_batch_norm"] = (int(fold), 0, "")
    timed_whole = choice.mode == "auto" and not choice.forced
    if timed_whole and (fold or any(installed(la) for la in _all_layers(fast))):
        record = _graph_trial(model, own, fast, shape, resolved)
        report.entries["whole graph"] = (
            int(record["keep"]),
            0,
            f"{record['own_ms']:.0f} ms own graph, {record['kernel_ms']:.0f} ms with the kernels",
        )
    log.info(report.summary())
    return (
        (fast, report) if "whole graph" not in report.entries or record["keep"] else (own, report)
    )


def _graph_trial(model, own, fast, shape, precision):
    """Times the fast copy against the model's own graph (forward pass at ``shape``)."""
    architecture = json.dumps(model.get_config(), sort_keys=True, default=str)
    digest = hashlib.sha256(architecture.encode()).hexdigest()[:16]
    key = json.dumps(["whole graph", digest, list(shape), precision])

    def measure():
        x = tf.random.stateless_uniform(shape, seed=[5, 6], maxval=255.0)
        steps = [tf.function(lambda m=m: _total([m(x, training=False)])) for m in (fast, own)]
        return time_pair(*(lambda s=s: s().numpy() for s in steps))

    return _cached_trial(key, measure)
