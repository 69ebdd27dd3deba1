"""Training: whole `pspnet-tf train` runs (learns, resumes after a kill, mixed precision,
configs) and compile_for_training's recipe."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from conftest import REPO, tiny_pspnet

from pspnet_tf import get_metadata
from pspnet_tf.data.demo import DEMO_CLASSES
from pspnet_tf.training.recipe import (
    DEFAULTS,
    compile_for_training,
    load_config,
    resolve_config,
    train,
)

ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
EPOCHS, STEPS, LR = 10, 8, 0.05


@pytest.fixture(scope="module")
def resumed_run(demo_root, tmp_path_factory):
    """`pspnet-tf train` killed after its first epoch's backup, then run again.

    The tiny model learns this generated dataset (shapes told apart by outline, not
    colour) only after hundreds of steps at larger sizes, so within the test's budget
    validation runs on the training images without augmentation: the check is that
    the loop fits its data and the validation path measures it, not generalisation.
    """
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"backbone": "mobilenetv2", "alpha": 0.35, "aux_head": False, "loss": "ce",
             "scale_range": [1.0, 1.0], "max_rotation": 0.0, "blur": False, "epochs": 99}
        )
    )  # fmt: skip
    output = folder / "run"
    command = [
        sys.executable, "-m", "pspnet_tf", "train", "--config", str(config), "--data",
        demo_root, "--layout", "voc", "--num-classes", "6", "--crop-size", "64",
        "--batch-size", "8", "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS),
        "--learning-rate", str(LR), "--val-split", "train", "--output", str(output),
    ]  # fmt: skip
    metadata = output / "backup" / "training_metadata.json"
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch")):
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no epoch finished in 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    killed_at = json.loads(metadata.read_text())["epoch"]
    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return output, killed_at, second.stdout


def _history(output):
    rows = {}
    with open(output / "history.csv") as file:
        header = file.readline().strip().split(",")
        for line in file:
            row = dict(zip(header, line.strip().split(","), strict=True))
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items()}  # last one wins
    return [rows[e] for e in sorted(rows)]


def test_killed_run_resumes_and_finishes_the_same_schedule(resumed_run):
    output, killed_at, stdout = resumed_run
    assert 1 <= killed_at < EPOCHS, "the first run finished before it could be killed"
    epochs = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"epoch {e}/{EPOCHS}" for e in range(killed_at + 1, EPOCHS + 1)]
    history = _history(output)
    assert [int(row["epoch"]) for row in history] == list(range(EPOCHS))
    # The optimizer's step count continued: the poly learning rate after each epoch is
    # the one of the global step, also after the restart.
    expected = [LR * (1 - (e + 1) / EPOCHS) ** 0.9 for e in range(EPOCHS)]
    np.testing.assert_allclose([row["learning_rate"] for row in history], expected, atol=1e-7)
    with h5py.File(output / "backup" / "latest.weights.h5") as weights:
        assert int(weights["optimizer"]["vars"]["0"][()]) == EPOCHS * STEPS  # iterations
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["epochs"] == EPOCHS and saved["alpha"] == 0.35 and saved["val_split"] == "train"


def test_cli_run_learns_and_writes_an_any_size_model(resumed_run):
    output, _, _ = resumed_run
    history = _history(output)
    loss = [row["loss"] for row in history]
    miou = [row["val_crop_miou"] for row in history]
    assert loss[-1] < 0.6 * loss[0], loss
    # Predicting only the majority class scores 0.135 on these images (so do the first
    # epochs); the fitted model gets about 0.23.
    assert miou[-1] > 0.175 and miou[-1] > miou[0] + 0.04, miou
    model = keras.models.load_model(output / "model.keras")
    assert model.input_shape == (None, None, None, 3)
    assert get_metadata(model)["class_names"] == list(DEMO_CLASSES)
    assert model(np.zeros((1, 48, 80, 3), "float32")).shape == (1, 48, 80, 6)
    # The crop it trained at is the default window of evaluate --mode sliding.
    from pspnet_tf import as_predictor
    from pspnet_tf.infer.modes import predict_scores

    assert as_predictor(model).crop_size == (64, 64)
    image = np.random.default_rng(0).uniform(0, 255, (70, 90, 3)).astype("float32")
    assert predict_scores(as_predictor(model), image, "sliding").shape == (70, 90, 6)
    for name in ("best.keras", "last.keras"):
        assert (output / "checkpoints" / name).is_file()


def test_mixed_precision_run_gives_finite_float32_logits(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, (4, 32, 32)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((images, {"main": labels, "aux": labels})).batch(2)
    before = keras.config.dtype_policy().name
    model, history = train(
        {"num_classes": 3, "backbone": "mobilenetv2", "alpha": 0.35, "crop_size": 32},
        train_dataset=data,
        precision="bfloat16",
        epochs=1,
        output=str(tmp_path),
        verbose=0,
    )
    assert keras.config.dtype_policy().name == before  # restored after the run
    assert model.get_layer("Conv1").compute_dtype == "bfloat16"
    assert np.isfinite(history.history["loss"][0])
    logits = model(images, training=False)
    for key in ("main", "aux"):
        assert logits[key].dtype == tf.float32
        assert np.isfinite(logits[key].numpy()).all()


def test_config_files_and_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"num_classes": 4, "output": "out", "loss": "focal+dice"}))
    config = resolve_config(str(path), epochs=3)
    assert (config["num_classes"], config["loss"], config["epochs"]) == (4, "focal+dice", 3)
    assert set(config) == set(DEFAULTS)
    path.write_text("num_classes: 4\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"run.json: unknown config keys \['learning_rte'\]"):
        load_config(str(path))
    with pytest.raises(ValueError, match="needs 'num_classes'"):
        resolve_config({"output": "out"})
    with pytest.raises(ValueError, match="loss must be one of"):
        resolve_config({"output": "out", "num_classes": 2, "loss": "hinge"})


def test_resuming_with_other_settings_is_refused(tmp_path, demo_root):
    saved = yaml.safe_dump({**DEFAULTS, "epochs": 5})
    (tmp_path / "config.yaml").write_text(saved)
    # A finished epoch: a folder with none binds to no settings (a corrected command runs).
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "latest.weights.h5").write_bytes(b"weights")
    result = subprocess.run(
        [sys.executable, "-m", "pspnet_tf", "train", "--num-classes", "2", "--epochs", "6",
         "--crop-size", "32", "--data", demo_root, "--output", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "holds a run with other settings" in result.stderr
    assert "epochs" in result.stderr and "num_classes" in result.stderr
    assert (tmp_path / "config.yaml").read_text() == saved


@pytest.mark.parametrize("name", ["voc2012", "cityscapes", "ade20k", "demo"])
def test_example_configs_are_valid(name):
    config = resolve_config(os.path.join(REPO, "examples", "configs", f"{name}.yaml"), output="o")
    assert config["num_classes"] in (21, 19, 150, 6)
    if name != "demo":  # the paper's recipe
        assert (config["learning_rate"], config["momentum"], config["power"]) == (0.01, 0.9, 0.9)
        assert (config["weight_decay"], config["aux_weight"], config["batch_size"]) == (
            1e-4,
            0.4,
            16,
        )
        assert config["crop_size"] == {"cityscapes": 713}.get(name, 473)


def test_demo_config_is_what_the_demo_trains_with():
    from pspnet_tf.demo import SETTINGS

    config = load_config(os.path.join(REPO, "examples", "configs", "demo.yaml"))
    assert {k: config[k] for k in SETTINGS["default"]["train"]} == SETTINGS["default"]["train"]


# compile_for_training: the paper's recipe on a tiny model.


def _softmax_ce(logits, labels, weights=None):
    valid = labels != 255
    z = logits[valid].astype("float64")
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(z)), labels[valid]].mean()


def test_compiled_loss_is_main_plus_0_4_aux(tiny_batch):
    images, labels = tiny_batch
    model = compile_for_training(tiny_pspnet(), total_steps=10)
    outputs = model(images, training=False)
    got = model.compute_loss(images, {"main": labels, "aux": labels}, outputs)
    main = _softmax_ce(outputs["main"].numpy(), labels)
    aux = _softmax_ce(outputs["aux"].numpy(), labels)
    np.testing.assert_allclose(float(got), main + 0.4 * aux, rtol=1e-4)
    assert model.optimizer.built and model.optimizer.l2_decay == 1e-4
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_one_xla_step_gives_the_plain_steps_loss_and_metrics(tiny_batch):
    images, labels = tiny_batch
    results = {}
    for jit in (False, True):
        model = compile_for_training(tiny_pspnet(), total_steps=10, jit_compile=jit)
        results[jit] = model.train_on_batch(
            images, {"main": labels, "aux": labels}, return_dict=True
        )
        assert model.jit_compile is jit  # Keras did not turn XLA off behind our back
    assert "main_crop_miou" in results[True]
    for key, value in results[False].items():
        np.testing.assert_allclose(results[True][key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_jit_compile_auto_follows_keras():
    # Keras' "auto": XLA only where a device other than the CPU runs (none in CI).
    model = compile_for_training(tiny_pspnet(aux_head=False), total_steps=1)
    assert model.jit_compile is bool(tf.config.list_physical_devices("GPU"))


def test_cli_train_with_jit_compile_true_finishes(demo_root, tmp_path):
    from pspnet_tf.cli import main as cli_main

    config = tmp_path / "xla.yaml"
    config.write_text(
        yaml.safe_dump({"backbone": "mobilenetv2", "alpha": 0.35, "aux_head": False,
                        "jit_compile": True, "val_split": None})
    )  # fmt: skip
    code = cli_main([
        "train", "--config", str(config), "--data", demo_root, "--layout", "voc",
        "--num-classes", "6", "--crop-size", "32", "--batch-size", "2", "--epochs", "1",
        "--steps-per-epoch", "2", "--verbose", "0", "--output", str(tmp_path / "run"),
    ])  # fmt: skip
    assert code == 0
    assert keras.models.load_model(tmp_path / "run" / "model.keras").count_params() > 0


def test_head_learning_rate_multiplier_reaches_head_variables_only():
    model = compile_for_training(tiny_pspnet(), total_steps=10, head_lr_multiplier=10.0)
    multipliers = dict(
        zip([v.path for v in model.trainable_variables], model.optimizer._multipliers, strict=True)
    )
    assert multipliers["main_classifier/kernel"] == 10.0
    assert multipliers["ppm_branch1_conv/kernel"] == 10.0
    assert multipliers["aux_head_bn/gamma"] == 10.0
    assert multipliers["Conv1/kernel"] == 1.0
    assert multipliers["block_16_project_BN/beta"] == 1.0


def test_adamw_step_follows_the_poly_schedule_with_decoupled_decay(tiny_batch):
    """One AdamW step against a numpy Adam update (first step: m/v bias-corrected)."""
    images, labels = tiny_batch
    model = compile_for_training(
        tiny_pspnet(), total_steps=10, optimizer="adamw", learning_rate=0.002, weight_decay=0.01
    )
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    variable = model.get_layer("main_classifier").kernel
    before = variable.numpy().astype("float64")
    targets = {"main": labels, "aux": labels}
    with tf.GradientTape() as tape:
        loss = model.compute_loss(images, targets, model(images, training=True))
    gradient = tape.gradient(loss, variable).numpy().astype("float64")
    model.optimizer.apply_gradients([(tf.constant(gradient, variable.dtype), variable)])
    lr = 0.002  # step 0 of the poly schedule
    m, v = 0.1 * gradient, 0.001 * gradient**2  # (1 - beta) * g, (1 - beta2) * g^2
    step = lr * np.sqrt(1 - 0.999) / (1 - 0.9) * m / (np.sqrt(v) + 1e-7)
    expected = before * (1 - lr * 0.01) - step  # decoupled decay, then the Adam step
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="head_lr_multiplier"):
        compile_for_training(tiny_pspnet(), total_steps=1, optimizer="adamw", head_lr_multiplier=10)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        compile_for_training(tiny_pspnet(), total_steps=1, optimizer="adam")


def _main_loss(config):
    return config["loss"]["main"]


def _sgd(config):
    return config["optimizer"]["config"]


def _schedule(config):
    return _sgd(config)["learning_rate"]["config"]


# Every key of RECIPE_KEYS: a value other than the default, where compile_for_training
# puts it (read from the model's compile config) and what it must read there.
RECIPE_EFFECTS = {
    "loss": ("dice", lambda c: _main_loss(c)["class_name"], "DiceLoss"),
    "class_weights": ([1.0, 2.0, 3.0], lambda c: _main_loss(c)["config"]["class_weights"],
                      [1.0, 2.0, 3.0]),
    "focal_gamma": (3.0, lambda c: _main_loss(c)["config"]["gamma"], 3.0),
    "focal_alpha": (0.25, lambda c: _main_loss(c)["config"]["alpha"], 0.25),
    "learning_rate": (0.03, lambda c: _schedule(c)["initial_learning_rate"], 0.03),
    "momentum": (0.5, lambda c: _sgd(c)["momentum"], 0.5),
    "weight_decay": (5e-4, lambda c: _sgd(c)["l2_decay"], 5e-4),
    "power": (1.5, lambda c: _schedule(c)["power"], 1.5),
    "warmup_steps": (3, lambda c: _schedule(c)["warmup_steps"], 3),
    "head_lr_multiplier": (10.0, lambda c: _sgd(c)["lr_multipliers"], {"ppm_": 10.0, "main_": 10.0,
                                                                      "aux_": 10.0}),
    "aux_weight": (0.25, lambda c: c["loss_weights"]["aux"], 0.25),
    "optimizer": ("adamw", lambda c: c["optimizer"]["class_name"], "AdamW"),
    "jit_compile": (True, lambda c: c["jit_compile"], True),
}  # fmt: skip


def test_every_recipe_key_reaches_compile_for_training(monkeypatch):
    from pspnet_tf.training import recipe as training

    assert set(RECIPE_EFFECTS) == set(training.RECIPE_KEYS)
    compiled = {}

    def record(model, *, total_steps, **recipe):
        compiled["config"] = compile_for_training(
            model, total_steps=total_steps, **recipe
        ).get_compile_config()
        return model

    monkeypatch.setattr(training, "compile_for_training", record)
    base = {**DEFAULTS, "num_classes": 3, "backbone": "mobilenetv2", "alpha": 0.35,
            "crop_size": 32, "output": "unused", "loss": "focal", "strategy": "none"}  # fmt: skip
    strategy = tf.distribute.get_strategy()
    training._build_and_compile(base, strategy, total_steps=10)
    default = compiled["config"]
    for key, (value, where, expected) in RECIPE_EFFECTS.items():
        config = {**base, key: value}
        training._build_and_compile(config, strategy, total_steps=10)
        assert where(compiled["config"]) == expected, key
        assert where(default) != expected, key
