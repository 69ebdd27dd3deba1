"""Kernel choice where the model runs: probes, timed trials and their cache, same results.

The training and inference results with the kernels chosen here equal those of the
model's own graph (< 1e-4 relative logits; the same weights, moving statistics and loss
after a training step), whatever was chosen, also when every probe fails.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BIAS, KERNEL, randomize_batch_norm, randomize_weights

from pspnet_tf import (
    autotune,
    build_pspnet,
    inference_model,
    kernels,
    machine,
    rebuild,
    trial_cache,
)
from pspnet_tf.inference_copy import FrozenGraph
from pspnet_tf.training import compile_for_training

SIZE, CLASSES = 64, 4


def _model(backbone, seed=0):
    keras.utils.set_random_seed(seed)
    alpha = 0.35 if backbone == "mobilenetv2" else 1.0
    model = build_pspnet(
        CLASSES, backbone, (SIZE, SIZE, 3), aux_head=True, alpha=alpha, dropout=0.0
    )
    return randomize_batch_norm(model, seed=seed)


def _batch(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, (batch, SIZE, SIZE)).astype("int32")
    return images, {"main": labels, "aux": labels}


def _relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_parse_choice_modes_forced_names_and_errors(monkeypatch):
    monkeypatch.delenv("PSPNET_TF_KERNELS", raising=False)
    assert autotune.parse_choice(None) == autotune.Choice("auto")  # the default
    assert autotune.parse_choice("probe") == autotune.Choice("probe")
    choice = autotune.parse_choice("tap_conv=off, fused_batch_norm=on")
    assert choice.mode == "auto"
    assert choice.forced_value("tap_conv") is False
    assert choice.forced_value("fused_batch_norm") is True
    assert choice.forced_value("native_dilated_conv") is None
    monkeypatch.setenv("PSPNET_TF_KERNELS", "off")
    assert autotune.parse_choice(None).mode == "off"
    monkeypatch.setenv("PSPNET_TF_KERNELS", "fast")
    with pytest.raises(ValueError, match="PSPNET_TF_KERNELS='fast'"):
        autotune.parse_choice(None)
    with pytest.raises(ValueError, match="kernels='tap_conv=yes'.*'tap_conv=yes'"):
        autotune.parse_choice("tap_conv=yes")


def test_probe_rejects_a_kernel_that_raises_or_differs(monkeypatch):
    kernel = next(k for k in kernels.KERNELS if k.name == "tap_conv")

    def use(call):
        monkeypatch.setattr(autotune, "KERNELS", (dataclasses.replace(kernel, call=call),))
        autotune.probe.cache_clear()

    def broken(layer, inputs):
        raise NotImplementedError("no such kernel here")

    def wrong(layer, inputs):
        return kernel.call(layer, inputs) * 1.01

    try:
        use(broken)
        assert autotune.probe("tap_conv", False) == (
            False,
            "NotImplementedError: no such kernel here",
        )
        use(wrong)
        ok, why = autotune.probe("tap_conv", False)
        assert not ok and "differ" in why
    finally:
        autotune.probe.cache_clear()


def test_trial_results_are_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("PSPNET_TF_CACHE_DIR", str(tmp_path))
    trial_cache.memory.clear()
    timings = []

    def fake_time_pair(first, second, runs=3):
        timings.append(runs)
        return 0.001, 0.002  # the kernel twice as fast

    monkeypatch.setattr(autotune, "time_pair", fake_time_pair)
    model = _model("resnet50")
    report = autotune.for_training(model, kernels="auto")
    dilated = [la for la in model.layers if max(getattr(la, "dilation_rate", (1,))) > 1]
    expected_trials = len(timings)
    assert expected_trials > 0
    if autotune.probe("native_dilated_conv", True)[0]:
        assert all(kernels.installed(la) == "native_dilated_conv" for la in dilated)
        assert report.entries["native_dilated_conv"][:2] == (len(dilated), len(dilated))
    with open(tmp_path / "kernels.json") as f:
        stored = json.load(f)
    assert list(stored) == [trial_cache.machine_key()]
    assert all(record["keep"] for record in stored[trial_cache.machine_key()].values())
    # A second model of the same shapes (and a new process, reading the file) trials nothing.
    trial_cache.memory.clear()
    autotune.for_training(_model("resnet50"), kernels="auto")
    assert len(timings) == expected_trials
    # An unreadable cache is reported and replaced, not a crash.
    (tmp_path / "kernels.json").write_text("{not json")
    trial_cache.memory.clear()
    autotune.for_training(_model("resnet50"), kernels="auto")
    assert len(timings) == 2 * expected_trials
    with open(tmp_path / "kernels.json") as f:
        assert trial_cache.machine_key() in json.load(f)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    trial_cache.memory.clear()


def _train_step(model, kernels_choice):
    """One SGD step of the paper's recipe: the loss, and every weight before and after."""
    compile_for_training(model, total_steps=10, kernels=kernels_choice)
    images, targets = _batch()
    before = [w.numpy() for w in model.weights]
    loss = model.train_on_batch(images, targets)
    return loss, before, [w.numpy() for w in model.weights]


def _compare_steps(backbone, kernels_choice):
    """A step with ``kernels_choice`` against the portable one: ``(fast, portable)``."""
    fast_model, portable_model = _model(backbone), _model(backbone)
    fast = _train_step(fast_model, kernels_choice)
    portable = _train_step(portable_model, "off")
    assert any(kernels.installed(la) for la in fast_model.layers)
    assert not any(kernels.installed(la) for la in portable_model.layers)
    np.testing.assert_allclose(fast[0], portable[0], rtol=1e-5)  # losses
    paths = [v.path for v in fast_model.weights]
    for ours, reference, path in zip(fast[2], portable[2], paths, strict=True):
        if "moving" in path:  # batch statistics: from the forward pass alone
            np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6, err_msg=path)
    return fast, portable, paths


def test_training_with_every_kernel_that_runs_gives_the_same_loss_and_statistics():
    _compare_steps("mobilenetv2", "probe")  # ResNet-50's kernels: the test below


def test_training_convolution_kernels_give_the_same_gradients():
    """The weights' SGD updates (the learning rate times the gradients), every weight.

    The fused BatchNorm is left out here: with 2 images of 64x64 the PPM's 1x1 bin sees 2
    values per channel and deep in the backbone some channels are near-constant, where
    float32 rounding of the batch statistics differs between any two implementations by
    percents. Its gradients are compared layer by layer in test_kernels.py.
    """
    choice = "fused_batch_norm=off,native_dilated_conv=on,tap_conv=on"
    if not autotune.probe("native_dilated_conv", True)[0]:
        choice = "fused_batch_norm=off,native_dilated_conv=off,tap_conv=on"
    fast, portable, paths = _compare_steps("resnet50", choice)
    updates = [
        (after - before, reference_after - before)
        for before, after, reference_after in zip(fast[1], fast[2], portable[2], strict=True)
    ]
    scale = max(np.abs(reference).max() for _, reference in updates)
    for (ours, reference), path in zip(updates, paths, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3 * scale, err_msg=path)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_inference_copy_with_kernels_gives_the_model_logits(backbone, rng):
    model = rebuild(inference_model(_model(backbone)), input_shape=(None, None, 3))
    randomize_weights(model, seed=2)
    images = rng.uniform(0, 255, (1, 48, 56, 3)).astype("float32")
    reference = model(images, training=False).numpy()
    for choice in ("probe", "frozen_weights=on", "auto"):
        fast, report = autotune.for_inference(model, kernels=choice, sample_shape=images.shape)
        assert fast is not model or choice == "auto"  # auto may keep the model's own graph
        assert isinstance(fast, FrozenGraph) == (choice != "probe" and fast is not model)
        assert _relative_error(fast(images, training=False).numpy(), reference) < 1e-4
        other = rng.uniform(0, 255, (2, 40, 64, 3)).astype("float32")  # any size still runs
        expected = model(other, training=False).numpy()
        assert _relative_error(fast(other, training=False).numpy(), expected) < 1e-4
    assert report.entries["fold_batch_norm"][0] == 1
    assert "whole graph" in report.entries  # auto timed the copy against the model's graph
    assert "frozen_weights" in report.entries
    off, report = autotune.for_inference(model, kernels="off")
    assert off is model and not report.entries


def test_whole_graph_trial_keeps_a_faster_graph_only_with_the_same_logits(
    tmp_path, monkeypatch, pixelwise_model
):
    monkeypatch.setenv("PSPNET_TF_CACHE_DIR", str(tmp_path))
    trial_cache.memory.clear()
    timings = []

    def fake_time_alternating(steps, runs):  # the candidates' seconds, as set below
        timings.append(runs)
        return list(seconds), [step() for step in steps]

    monkeypatch.setattr(autotune, "time_alternating", fake_time_alternating)
    own = pixelwise_model(KERNEL, BIAS)
    same, wrong = FrozenGraph(own), FrozenGraph(pixelwise_model(KERNEL, BIAS + 0.5))
    cases = [  # candidate, its seconds against the own graph's 1.0, what the trial keeps
        (same, 0.5, "with the kernels"),
        (same, 0.98, "own graph"),  # within the 3% margin
        (wrong, 0.5, "own graph"),  # faster, but other logits
    ]
    for size, (candidate, faster, expected) in enumerate(cases, start=8):
        seconds = (1.0, faster)
        candidates = {"own graph": own, "with the kernels": candidate}
        record = autotune._graph_trial(own, candidates, (1, size, size, 3), None)
        assert record["choice"] == expected
        assert record["ms"] == {"own graph": 1000.0, "with the kernels": faster * 1000}
        assert ("differ" in record["why"]) == (candidate is wrong)
    assert timings == [autotune.GRAPH_TRIAL_RUNS] * 3
    # A frozen graph is checked against the copy it was made from (a bf16 folded copy rounds
    # differently from the own graph), where that source is given.
    seconds = (1.0, 0.5)
    source = {"with the kernels": pixelwise_model(KERNEL, BIAS + 0.5)}
    candidates = {"own graph": own, "with the kernels": wrong}
    record = autotune._graph_trial(own, candidates, (1, 12, 12, 3), None, source)
    assert record["choice"] == "with the kernels" and not record["why"]
    # Cached per machine and shape: the same trial again times nothing, in a new process too.
    trial_cache.memory.clear()
    seconds = (1.0, 2.0)
    again = autotune._graph_trial(
        own, {"own graph": own, "with the kernels": same}, (1, 8, 8, 3), None
    )
    assert again["choice"] == "with the kernels" and len(timings) == 4
    trial_cache.memory.clear()


def test_every_probe_failing_leaves_training_and_inference_as_the_portable_graph(monkeypatch, rng):
    monkeypatch.setattr(
        autotune, "probe", lambda name, training, dtype="float32": (False, "forced to fail")
    )
    fast_model, portable_model = _model("mobilenetv2"), _model("mobilenetv2")
    fast_loss, _, fast_weights = _train_step(fast_model, "auto")
    assert not any(kernels.installed(la) for la in fast_model.layers)
    portable_loss, _, portable_weights = _train_step(portable_model, "off")
    np.testing.assert_allclose(fast_loss, portable_loss, rtol=1e-6)
    for ours, reference in zip(fast_weights, portable_weights, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    model = inference_model(fast_model)
    fast, report = autotune.for_inference(model, kernels="probe")
    assert not any(kernels.installed(la) for la in fast.layers)
    assert all(
        "forced to fail" in why
        for name, (_, _, why) in report.entries.items()
        if name in kernels.KERNEL_NAMES
    )
    images = rng.uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")
    reference = model(images, training=False).numpy()
    assert _relative_error(fast(images, training=False).numpy(), reference) < 1e-4


# The other process: the other oneDNN setting (off is TF's default on AVX2-only CPUs, whose
# own CPU kernels reject dilation), given the files saved here with the kernels chosen here.
_OTHER_MACHINE = textwrap.dedent(
    """
    import sys, numpy as np, keras
    import pspnet_tf
    from pspnet_tf import export, machine
    from pspnet_tf.inference import as_predictor
    from pspnet_tf.training import compile_for_training
    assert machine.onednn_enabled() == (sys.argv[2] == "1")
    folder = sys.argv[1]
    data = np.load(folder + "/data.npz")
    for name in ("mobilenetv2", "resnet50", "legacy"):
        model = keras.models.load_model(f"{folder}/{name}.keras")
        images = data["images"]
        logits = as_predictor(model)(images)
        ref = data[name]
        assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-4, name
        if name != "legacy":
            compile_for_training(model, total_steps=2)
            labels = data["labels"]
            loss = model.train_on_batch(images, {"main": labels, "aux": labels})
            assert np.isfinite(loss).all() and loss[0] > 0, loss
        agreement = 1.0
        if name != "resnet50":  # the same export code; ResNet-50 is here for its training
            served = export.export_saved_model(model, f"{folder}/{name}_saved")
            agreement = export.saved_model_agreement(model, served, images.astype("uint8"))
        print(name, "ok", agreement)
    """
)


def test_saved_files_load_train_evaluate_and_export_with_the_other_onednn(tmp_path, rng):
    """Saved here with the kernels chosen here (oneDNN on, in CI's first run on any x86
    CPU), used in a process with oneDNN off; the other way round in CI's second run."""
    images, targets = _batch(seed=3, batch=1)
    images = np.round(images)  # uint8-exact, for the exported model's agreement
    saved = {}
    for backbone in ("mobilenetv2", "resnet50"):
        model = _model(backbone)
        compile_for_training(model, total_steps=2, kernels="probe")
        model.train_on_batch(images, targets)
        model.save(tmp_path / f"{backbone}.keras")
        saved[backbone] = inference_model(model)(images, training=False).numpy()
    # A file of pspnet_tf 0.1, whose fast layers were wired into the model.
    from pspnet_tf import layers as project_layers

    inputs = keras.Input((None, None, 3))
    x = project_layers.DilatedConv2D(4, 3, padding="same", dilation_rate=2)(inputs)
    x = project_layers.FusedBatchNorm()(x)
    x = project_layers.DilatedDepthwiseConv2D(3, padding="same", dilation_rate=4)(x)
    legacy = keras.Model(inputs, project_layers.MatmulConv2D(CLASSES, 3, padding="same")(x))
    randomize_weights(legacy, seed=5)
    legacy.save(tmp_path / "legacy.keras")
    saved["legacy"] = legacy(images).numpy()
    np.savez(tmp_path / "data.npz", images=images, labels=targets["main"], **saved)
    other = "0" if machine.onednn_enabled() else "1"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=other, PSPNET_TF_KERNELS="auto")
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_MACHINE, str(tmp_path), other],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line.split() for line in out.stdout.splitlines() if " ok " in line]
    assert [line[0] for line in lines] == ["mobilenetv2", "resnet50", "legacy"]
    assert all(float(line[2]) > 0.99 for line in lines)  # SavedModel labels = Keras labels
