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
   it is faster. An inference copy, its weights frozen into constants
   (:class:`pspnet_tf.inference_copy.FrozenGraph`), is also timed whole against the
   model's own graph, and the faster of the two runs.

:func:`for_training` installs training kernels on a model in place (what
:func:`pspnet_tf.training.compile_for_training` calls); :func:`for_inference` returns
the copy prediction and evaluation run (BatchNorm folded where that wins, see
:mod:`pspnet_tf.inference_copy`). Neither changes what ``model.save`` or export write.

The choice: the ``kernels`` argument, else the ``PSPNET_TF_KERNELS`` variable:

- ``"auto"`` (default): probe and trial, as above.
- ``"probe"``: every kernel that runs here, no timing (weights not frozen).
- ``"off"``: none; the model's own graph (Keras' layers, BatchNorm not folded).
- ``"NAME=on,NAME=off,..."``: force kernels on (still only where they run) or off; the
  others as ``"auto"``. Names: :data:`CHOICE_NAMES`.

``PSPNET_TF_CACHE_DIR`` moves the trial cache (:mod:`pspnet_tf.trial_cache`).
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

from pspnet_tf.inference_copy import FrozenGraph, inference_copy
from pspnet_tf.kernels import KERNEL_NAMES, KERNELS, install, uninstall
from pspnet_tf.precision import resolve_precision
from pspnet_tf.trial_cache import load, store

log = logging.getLogger("pspnet_tf")

KERNELS_VARIABLE = "PSPNET_TF_KERNELS"
MODES = ("auto", "probe", "off")
# Folding BatchNorm into the convs and freezing the weights into constants are decided
# with the kernels (by the whole-graph trial).
CHOICE_NAMES = ("fold_batch_norm", "frozen_weights", *KERNEL_NAMES)
TRIAL_RUNS = 3  # timed calls of each side after one warm-up, alternating
# The whole graph gets more: on a 2-core VM one ResNet-50 pass varies by up to 25% from
# call to call, and three runs picked the slower graph there.
GRAPH_TRIAL_RUNS = 5
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
    tolerance = _tolerance(dtype not in ("float32", "float64"))
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


def _tolerance(reduced):
    """The relative difference a kernel or graph may make: 1e-4 on float32 results, 2e-2
    where bfloat16 or float16 computes them (``reduced``)."""
    return 2e-2 if reduced else 1e-4


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


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pair(first, second, runs=TRIAL_RUNS):
    """Median seconds of ``first()`` and ``second()``, alternating after one warm-up each."""
    return time_alternating([first, second], runs)[0]


def time_alternating(steps, runs):
    """Median seconds of each of ``steps``, called in turn ``runs`` times after one warm-up
    each, and what each warm-up call returned."""
    with _quiet_tracing():
        results = [step() for step in steps]
        times = [[] for _ in steps]
        for _ in range(runs):
            for step, record in zip(steps, times, strict=True):
                record.append(_timed(step))
    return [statistics.median(t) for t in times], results


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
    record = load().get(key)
    if record is None:
        kernel_s, own_s = measure()
        record = {"kernel_ms": kernel_s * 1e3, "own_ms": own_s * 1e3}
        record["keep"] = kernel_s < _MARGIN * own_s
        store(key, record)
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
    result, its weights frozen into constants
    (:class:`pspnet_tf.inference_copy.FrozenGraph`), is timed whole against the model's
    own graph at ``precision``, and the faster is returned (``frozen_weights=on`` freezes
    without a trial). Logits equal the model's own to float32 rounding.

    Args:
        model: a Keras model; functional and Sequential models get a copy, others come
            back as they are.
        precision: one of :data:`pspnet_tf.precision.PRECISIONS` or None.
        kernels: str or None. See the module docstring.
        sample_shape: ``(batch, h, w, 3)`` the trials time; defaults to the model's input
            shape (batch 1, 512 x 512 for any-size models).

    Returns:
        ``(model to call, Report)``. Call it as ``fn(images, training=False)``; it is a
        Keras model, or a :class:`~pspnet_tf.inference_copy.FrozenGraph` (no layers;
        any batch, the spatial sizes of ``model``'s input).

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
    chosen = fast
    if choice.forced_value("frozen_weights"):
        chosen, why = _frozen(fast)
        report.entries["frozen_weights"] = (int(chosen is not fast), 0, why or "forced on")
    elif choice.mode == "auto" and not choice.forced:
        # The copy is timed frozen: freezing was never slower where measured (equal with
        # TF's own CPU kernels, 5-20% faster with oneDNN), and timing it both ways too
        # would add a minute to a ResNet's first prediction on a slow CPU.
        frozen, why = _frozen(fast)
        candidates = {"own graph": own, "with the kernels": frozen}
        record = _graph_trial(model, candidates, shape, resolved, {"with the kernels": fast})
        chosen = candidates[record["choice"]]
        if frozen is not fast:
            why = record["why"] or ("" if chosen is frozen else "slower than the own graph")
        report.entries["frozen_weights"] = (int(chosen is frozen and frozen is not fast), 0, why)
        times = ", ".join(f"{ms:.0f} ms {name}" for name, ms in record["ms"].items())
        report.entries["whole graph"] = (int(chosen is not own), 0, times)
    log.info(report.summary())
    return chosen, report


def _frozen(model):
    """``(FrozenGraph of model, "")``, or ``(model, why not)`` where freezing fails here."""
    try:
        return FrozenGraph(model), ""
    except Exception as error:  # a graph TF cannot freeze (e.g. resource ops it lacks)
        return model, f"does not run here: {_reason(error)}"


def _graph_trial(model, candidates, shape, precision, sources=None):
    """Times ``candidates`` (``{name: callable}``, the model's own graph first) whole.

    A candidate replaces the best before it only where it is 3% faster and gives the
    logits of its source (``sources[name]``, e.g. the copy a frozen graph was made from;
    else the own graph) to 1e-4 relative (2e-2 at reduced precision, ``precision`` or a
    model built under a mixed policy: folded and unfolded graphs round differently there).
    Returns ``{"choice": name, "ms": {name: ms}, "why": str}``, cached.
    """
    architecture = json.dumps(model.get_config(), sort_keys=True, default=str)
    digest = hashlib.sha256(architecture.encode()).hexdigest()[:16]
    names = [f"{name} ({type(fn).__name__})" for name, fn in candidates.items()]
    key = json.dumps(["whole graph 2", digest, list(shape), precision, names])
    record = load().get(key)
    if record is not None:
        return record
    x = tf.random.stateless_uniform(shape, seed=[5, 6], maxval=255.0)
    steps = [tf.function(lambda m=m: m(x, training=False)) for m in candidates.values()]
    seconds, outputs = time_alternating(
        [lambda s=s: tf.nest.map_structure(np.asarray, s()) for s in steps], GRAPH_TRIAL_RUNS
    )
    record = {"ms": {name: t * 1e3 for name, t in zip(candidates, seconds, strict=True)}, "why": ""}
    policies = _policies(list(_all_layers(model)))
    reduced = precision not in (None, "float32") or policies != ["float32"]
    tolerance = _tolerance(reduced)
    best = "own graph"
    for (name, took), output in zip(record["ms"].items(), outputs, strict=True):
        source = (sources or {}).get(name)
        expected = outputs[0] if source is None else source(x, training=False)
        error = _relative_error(output, tf.nest.map_structure(np.asarray, expected))
        if error > tolerance:
            record["why"] = f"{name}: logits differ by {error:.1e} (relative)"
        elif took < _MARGIN * record["ms"][best]:
            best = name
    record["choice"] = best
    store(key, record)
    return record


def _relative_error(outputs, reference):
    """The largest difference between two (nested) outputs, relative to the reference."""
    pairs = zip(tf.nest.flatten(outputs), tf.nest.flatten(reference), strict=True)
    return max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12) for a, b in pairs)
