"""What `pspnet-tf train` gets from bad flags, bad data and a damaged run folder.

Every refusal is one line on stderr naming the flag or file (no traceback), exit 2 for a
bad flag value and 1 for bad data or files, and leaves nothing in --output; every repair
of a run folder is said on stdout and leaves a run that resumes to the requested epoch.
In-process through `cli.main` (one TensorFlow start), on a 4+2 image dataset of 32 px.
"""

import csv
import io
import logging
import os
import shutil
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from conftest import REPO
from PIL import Image

from pspnet_tf import cli
from pspnet_tf.data.demo import make_demo_dataset
from pspnet_tf.training import run_folder
from pspnet_tf.training.recipe import train

EPOCHS, STEPS = 2, 2  # 4 training images, batch 2


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """cli.main adds its stderr handler once, bound to the stderr of that moment: a later
    test's capsys would not see it (and an earlier one's stream is closed)."""
    logger = logging.getLogger("pspnet_tf")
    handlers = list(logger.handlers)
    logger.handlers.clear()
    yield
    logger.handlers[:] = handlers


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_runs") / "data"
    return make_demo_dataset(root, num_train=4, num_val=2, size=32, seed=0)


@pytest.fixture
def data(clean_data, tmp_path):
    """A fresh copy of the dataset, for a test to damage."""
    return shutil.copytree(clean_data, tmp_path / "data")


def train_args(data, output, *extra):
    return [
        "train", "--data", str(data), "--layout", "voc", "--num-classes", "6",
        "--backbone", "mobilenetv2", "--alpha", "0.35", "--no-aux-head", "--crop-size", "32",
        "--batch-size", "2", "--epochs", str(EPOCHS), "--verbose", "0", "--output", str(output),
        *extra,
    ]  # fmt: skip


def run(argv, capsys):
    """``cli.main(argv)`` -> (exit code, stdout, the error line or None)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("pspnet-tf train: error: ")]
    assert len(errors) <= 1, err
    return code, out, errors[0] if errors else None


def hidden_temporaries(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp" in n]


def history_epochs(output):
    with open(os.path.join(output, "history.csv"), newline="") as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def optimizer_steps(output):
    with h5py.File(os.path.join(output, "backup", "latest.weights.h5")) as weights:
        return int(weights["optimizer"]["vars"]["0"][()])  # iterations


# --- bad flag values and config files: exit 2, nothing written ------------------------

FLAG_CASES = {
    "crop size 0": (["--crop-size", "0"], "--crop-size must be an integer >= 1"),
    "batch -1": (["--batch-size", "-1"], "--batch-size must be an integer >= 1"),
    "classes 0": (["--num-classes", "0"], "--num-classes must be an integer from 2"),
    "classes 1": (["--num-classes", "1"], "--num-classes must be an integer from 2"),
    "epochs 0": (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    "alpha 0": (["--alpha", "0"], "--alpha must be a number > 0"),
    "alpha -1": (
        ["--alpha", "-1"],
        "--alpha must be a number > 0 (MobileNetV2 width multiplier), got -1.0",
    ),
    "steps 0": (["--steps-per-epoch", "0"], "--steps-per-epoch must be null or an integer"),
    "missing data folder": (["--data", "/no/such/data"], "'/no/such/data': no such folder"),
    "backbone frozen longer than the run": (
        ["--freeze-backbone-epochs", "3"],
        "--freeze-backbone-epochs must be at most epochs = 2",
    ),
    "float16 on a CPU": (["--precision", "float16"], "--precision float16 needs a GPU"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flag_values_exit_2_naming_the_flag_before_writing(case, clean_data, tmp_path, capsys):
    extra, message = FLAG_CASES[case]
    if "float16" in extra and tf.config.list_physical_devices("GPU"):
        pytest.skip("float16 trains on a GPU")
    output = tmp_path / "run"
    code, _, error = run(train_args(clean_data, output, *extra), capsys)
    assert code == 2 and message in error, error
    assert not output.exists()


CONFIG_CASES = {
    "unknown backbone": ("backbone: vgg16\n", "backbone must be one of"),
    "unknown key": ("learning_rte: 0.1\n", "unknown config keys ['learning_rte']"),
    "invalid YAML": ("epochs: [1, 2\n", "not valid YAML/JSON"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping"),
    "bad bad_files": ("bad_files: ignore\n", "bad_files must be one of ['refuse', 'skip']"),
    "class weights all 0": ("class_weights: [0, 0, 0, 0, 0, 0]\n", "class_weights must be null"),
    "class weights text": ("class_weights: abc\n", "class_weights must be null or a list"),
    "class weights negative": ("class_weights: [1, -1, 1, 1, 1, 1]\n", "numbers >= 0"),
    "class weights NaN": ("class_weights: [1, .nan, 1, 1, 1, 1]\n", "got [1, nan"),
    "class weights too few": ("class_weights: [1, 2]\n", "num_classes = 6 values, got 2"),
    "jit_compile maybe": ("jit_compile: maybe\n", "jit_compile must be auto, true or false"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_files_exit_2_naming_the_file(case, clean_data, tmp_path, capsys):
    text, message = CONFIG_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    output = tmp_path / "run"
    argv = train_args(clean_data, output, "--config", config)
    if text.startswith("backbone"):  # the flag would win over the file
        del argv[argv.index("--backbone") : argv.index("--backbone") + 2]
    code, _, error = run(argv, capsys)
    assert code == 2 and message in error and str(config) in error, error
    assert not output.exists()


def test_missing_data_or_config_file_exit_2(clean_data, tmp_path, capsys):
    argv = train_args(clean_data, tmp_path / "run")
    del argv[1:3]  # --data DIR
    code, _, error = run(argv, capsys)
    assert code == 2 and "needs 'data'" in error and "--data" in error, error
    code, _, error = run(argv + ["--config", tmp_path / "none.yaml"], capsys)
    assert code == 2 and "none.yaml: no such config file" in error, error
    assert not (tmp_path / "run").exists()


def test_a_flag_outside_its_choices_is_argparse_s_exit_2(clean_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(train_args(clean_data, tmp_path / "run", "--backbone", "vgg16"))
    assert exit_info.value.code == 2 and "--backbone" in capsys.readouterr().err


# --- bad data: exit 1 before the model is built, naming the file -----------------------


def _write_png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _corrupt_jpeg_body(path):
    raw = open(path, "rb").read()
    noise = np.random.default_rng(0).integers(0, 255, len(raw), dtype=np.uint8).tobytes()
    open(path, "wb").write(raw[:300] + noise[: len(raw) - 302] + b"\xff\xd9")


DATA_CASES = {  # what to do to train_00001 (or the split), the message
    "unreadable image": (lambda i, lb, d: open(i, "wb").write(b"not an image"), "jpg: unreadable"),
    "corrupt JPEG body": (lambda i, lb, d: _corrupt_jpeg_body(i), "jpg: unreadable or truncated"),
    "0-byte image": (lambda i, lb, d: open(i, "wb").close(), "jpg: unreadable"),
    "WebP named .jpg": (
        lambda i, lb, d: Image.open(i).convert("RGB").save(i, format="WEBP"),
        "jpg: not a JPEG, PNG, BMP or GIF file (training decodes only those",
    ),
    "size mismatch": (lambda i, lb, d: _write_png(lb, np.zeros((16, 16))), "png: label size 16x16"),
    "label out of range": (lambda i, lb, d: _write_png(lb, np.full((32, 32), 9)), "values >= num"),
    "RGB label": (
        lambda i, lb, d: _write_png(lb, np.random.default_rng(0).integers(0, 6, (32, 32, 3))),
        "png: RGB colour label",
    ),
    "missing file": (lambda i, lb, d: os.remove(i), "jpg: file missing"),
    "empty split": (
        lambda i, lb, d: open(os.path.join(d, "ImageSets", "Segmentation", "train.txt"), "w"),
        "no images in split 'train'",
    ),
    "missing split file": (
        lambda i, lb, d: os.remove(os.path.join(d, "ImageSets", "Segmentation", "train.txt")),
        "train.txt",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_exits_1_naming_the_file_before_building(case, data, tmp_path, capsys):
    damage, message = DATA_CASES[case]
    image = os.path.join(data, "JPEGImages", "train_00001.jpg")
    label = os.path.join(data, "SegmentationClass", "train_00001.png")
    damage(image, label, data)
    output = tmp_path / "run"
    code, out, error = run(train_args(data, output), capsys)
    assert code == 1 and message in error, error
    assert "train_00001" in error or "split" in case, error
    assert "epoch 1/" not in out and not output.exists()


def test_bad_files_skip_leaves_them_out_and_says_so_every_epoch(data, tmp_path, capsys):
    _corrupt_jpeg_body(os.path.join(data, "JPEGImages", "train_00001.jpg"))
    output = tmp_path / "run"
    code, out, error = run(train_args(data, output, "--bad-files", "skip", "--batch-size", "1"),
                           capsys)  # fmt: skip
    assert code == 0, error
    assert "train_00001.jpg: unreadable or truncated image" in out
    assert "1 of 4 image/label pairs of split 'train' are bad" in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == EPOCHS and all(line.endswith("1 bad files skipped") for line in epochs)
    assert optimizer_steps(output) == EPOCHS * 3  # 3 good images, batch 1


def _pillow_reads_it(path):
    with Image.open(path) as image:
        image.load()


DECODE_CASES = {
    # Pillow ignores data after the JPEG's end; the tf.data path checks the end marker.
    "bytes after the end": (lambda raw: raw + b"\0" * 5000, "truncated image (no end marker)"),
    # Damaged after the scan (simulated by a scan that passes everything).
    "corrupt body": (None, "TensorFlow cannot decode it (jpeg::Uncompress failed"),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_data_errors_met_while_training_name_the_file(case, data, tmp_path, capsys, monkeypatch):
    change, message = DECODE_CASES[case]
    image = os.path.join(data, "JPEGImages", "train_00002.jpg")
    if change is None:
        _corrupt_jpeg_body(image)
        monkeypatch.setattr(
            "pspnet_tf.data.checks.check_pairs", lambda pairs, *a, **k: [[] for _ in pairs]
        )
    else:
        raw = open(image, "rb").read()
        open(image, "wb").write(change(raw))
        _pillow_reads_it(image)
    code, _, error = run(train_args(data, tmp_path / "run"), capsys)
    assert code == 1 and error.startswith(f"pspnet-tf train: error: {image}: ") and message in error


# --- a damaged run folder --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(clean_data, tmp_path_factory):
    """A run of EPOCHS epochs, finished; tests damage copies of it."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(train_args(clean_data, output)) == 0
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def _truncate(path, size=96):
    with open(path, "r+b") as file:
        file.truncate(size)


def test_truncated_backup_resumes_from_the_previous_and_logs_each_epoch_once(
    clean_data, run_copy, capsys
):
    latest = os.path.join(run_copy, "backup", "latest.weights.h5")
    _truncate(latest)
    code, out, error = run(train_args(clean_data, run_copy), capsys)
    assert code == 0, error
    assert f"{latest}: corrupt backup (" in out
    assert f"resumed from {latest}.bkp (after epoch 1): epoch 2 runs again" in out
    assert "history.csv: dropped the rows of epoch 2, which run again" in out
    assert [line[:9] for line in out.splitlines() if line.startswith("epoch ")] == ["epoch 2/2"]
    assert history_epochs(run_copy) == [0, 1]
    assert optimizer_steps(run_copy) == EPOCHS * STEPS
    assert not hidden_temporaries(run_copy)


def test_truncated_backup_without_a_previous_one_is_refused_with_the_way_out(
    clean_data, run_copy, capsys
):
    latest = os.path.join(run_copy, "backup", "latest.weights.h5")
    _truncate(latest)
    os.remove(latest + ".bkp")
    code, _, error = run(train_args(clean_data, run_copy), capsys)
    assert code == 1 and f"{latest}: corrupt backup" in error, error
    assert f"rm -r {run_copy}" in error and "no readable backup" in error


def test_kill_during_the_first_backup_write_leaves_a_run_that_resumes(
    clean_data, finished_run, tmp_path, capsys
):
    output = tmp_path / "run"
    backup = output / "backup"
    backup.mkdir(parents=True)
    shutil.copy(finished_run / "config.yaml", output)
    dead = _dead_pid()
    stale = backup / f".latest.tmp{dead}.weights.h5"  # this package's writer, killed
    stale.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 88)
    # Keras' own BackupAndRestore, killed in its first write: 96 bytes, no metadata.
    (backup / "latest.weights.h5").write_bytes(stale.read_bytes())
    code, out, error = run(train_args(clean_data, output), capsys)
    assert code == 0, error
    assert f"removed {stale}: a temporary file of a killed run" in out
    assert "the first backup was never finished; starting at epoch 1" in out
    assert history_epochs(output) == [0, 1]
    assert optimizer_steps(output) == EPOCHS * STEPS
    assert not hidden_temporaries(output)


_DIE_IN_FIRST_BACKUP = """
import os, signal, sys
import keras
from pspnet_tf import cli
save_weights = keras.Model.save_weights
def die_while_writing(self, path, *args, **kwargs):
    save_weights(self, path, *args, **kwargs)
    with open(path, "r+b") as file:
        file.truncate(96)
    os.kill(os.getpid(), signal.SIGKILL)
keras.Model.save_weights = die_while_writing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_in_the_first_backup_write_then_the_same_command_resumes(
    clean_data, tmp_path, capsys
):
    output = tmp_path / "run"
    argv = train_args(clean_data, output)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run([sys.executable, "-c", _DIE_IN_FIRST_BACKUP, *argv], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    (left,) = os.listdir(output / "backup")  # the temporary, nothing under the final name
    assert left.startswith(".latest.tmp") and left.endswith(".weights.h5")
    code, out, error = run(argv, capsys)
    assert code == 0, error
    assert f"removed {output / 'backup' / left}: a temporary file of a killed run" in out
    assert history_epochs(output) == [0, 1]
    assert optimizer_steps(output) == EPOCHS * STEPS
    assert not hidden_temporaries(output)


def test_corrupt_checkpoints_of_a_finished_run_are_said_and_rewritten(clean_data, run_copy, capsys):
    last = os.path.join(run_copy, "checkpoints", "last.keras")
    best = os.path.join(run_copy, "checkpoints", "best.keras")
    _truncate(last, 1000)
    open(best, "wb").write(b"not a zip")
    dead = _dead_pid()
    stale = [os.path.join(run_copy, f".model.tmp{dead}.keras"),
             os.path.join(run_copy, "checkpoints", f".last.tmp{dead}.keras")]  # fmt: skip
    for path in stale:
        open(path, "wb").write(b"half")
    code, out, error = run(train_args(clean_data, run_copy), capsys)
    assert code == 0, error
    assert f"{last}: corrupt checkpoint (" in out and "written again" in out
    assert f"{best}: corrupt checkpoint (" in out and "its weights are lost" in out
    assert all(f"removed {path}" in out for path in stale)
    assert "epoch 1/" not in out and "epoch 2/" not in out  # finished: nothing runs again
    model = keras.models.load_model(last)
    assert model.output_shape == (None, 32, 32, 6)
    assert not hidden_temporaries(run_copy)


def test_corrupt_config_of_a_run_with_backups_is_refused(clean_data, run_copy, capsys):
    config = os.path.join(run_copy, "config.yaml")
    open(config, "w").write("epochs: [2\n")
    code, _, error = run(train_args(clean_data, run_copy), capsys)
    assert code == 1 and f"{config}: corrupt run config" in error and "rm -r" in error, error


def test_a_corrupt_config_where_no_epoch_finished_is_replaced_and_said(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("epochs: [2\n")
    run_folder.prepare(str(tmp_path), {"epochs": 3}, write=False)
    assert "config.yaml" not in capsys.readouterr().out  # only compared
    assert (tmp_path / "config.yaml").read_text() == "epochs: [2\n"
    run_folder.prepare(str(tmp_path), {"epochs": 3})
    assert f"{tmp_path / 'config.yaml'}: corrupt run config (" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"epochs": 3}


def test_a_failed_run_does_not_block_the_corrected_command(clean_data, tmp_path, capsys):
    output = tmp_path / "run"
    code, _, _ = run(train_args(clean_data, output, "--batch-size", "-1"), capsys)
    assert code == 2 and not output.exists()
    # What an older version left after failing: its config, no finished epoch.
    output.mkdir()
    (output / "config.yaml").write_text(yaml.safe_dump({"batch_size": -1, "num_classes": 0}))
    code, out, error = run(train_args(clean_data, output), capsys)
    assert code == 0, error
    assert "config.yaml: replaced; no epoch had finished with its settings" in out
    assert yaml.safe_load((output / "config.yaml").read_text())["batch_size"] == 2


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_run_killed_twice_reaches_its_epochs_with_the_step_count_going_on(
    clean_data, tmp_path, monkeypatch
):
    """Killed right after the backup of epoch 1, resumed and killed after epoch 2, resumed."""
    output = str(tmp_path / "run")
    config = dict(data=clean_data, layout="voc", num_classes=6, backbone="mobilenetv2",
                  alpha=0.35, aux_head=False, crop_size=32, batch_size=2, epochs=3,
                  val_split=None, verbose=0, output=output)  # fmt: skip
    save = run_folder.Backup.save

    def save_then_die(self, epoch):
        save(self, epoch)
        if epoch == kill_after:
            raise _Killed

    monkeypatch.setattr(run_folder.Backup, "save", save_then_die)
    for kill_after in (1, 2):
        with pytest.raises(_Killed):
            train(config)
        assert optimizer_steps(output) == kill_after * STEPS
    kill_after = None
    model, history = train(config)
    assert history.epoch == [2]
    assert int(model.optimizer.iterations.numpy()) == 3 * STEPS
    assert history_epochs(output) == [0, 1, 2]


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def _tiny_compiled_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_kill_between_the_backup_renames_resumes_from_the_previous(tmp_path, capsys):
    backup = run_folder.Backup(str(tmp_path / "backup"))
    backup.set_model(_tiny_compiled_model())
    for epoch in (1, 2):
        backup.model.optimizer.iterations.assign(epoch * 10)
        backup.save(epoch)
    latest = tmp_path / "backup" / "latest.weights.h5"
    os.remove(latest)  # renamed to .bkp, the new one not yet renamed into place
    fresh = run_folder.Backup(str(tmp_path / "backup"))
    fresh.set_model(_tiny_compiled_model())
    assert fresh.restore() == 1
    assert int(fresh.model.optimizer.iterations.numpy()) == 10
    assert (
        f"{latest}: missing (killed while replacing it); resumed from {latest}.bkp (after "
        "epoch 1): epoch 2 runs again" in capsys.readouterr().out
    )
    assert sorted(os.listdir(tmp_path / "backup")) == [
        "latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json"
    ]  # fmt: skip


def test_history_log_drops_rows_of_epochs_run_again(tmp_path, capsys):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss\n0,1.0,1\n1,0.9,1\n2,0.8,1\n3,0.")  # 3: half-written
    log = run_folder.History(str(path))
    log.on_train_begin()
    log.on_epoch_end(2, {"loss": 0.7, "val_loss": 0.5})
    log.on_train_end()
    assert list(csv.reader(io.StringIO(path.read_text()))) == [
        ["epoch", "loss", "val_loss"], ["0", "1.0", "1"], ["1", "0.9", "1"], ["2", "0.7", "0.5"]
    ]  # fmt: skip
    assert "dropped the rows of epoch 3, 4, which run again" in capsys.readouterr().out


def test_ctrl_c_says_one_line_and_the_same_command_resumes(clean_data, tmp_path, capsys):
    output = tmp_path / "run"
    argv = train_args(clean_data, output)
    saved = run_folder.Backup.on_epoch_end

    def interrupt_after_the_first_backup(self, epoch, logs=None):
        saved(self, epoch, logs)
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    run_folder.Backup.on_epoch_end = interrupt_after_the_first_backup
    try:
        capsys.readouterr()
        code = cli.main([str(a) for a in argv])
    finally:
        run_folder.Backup.on_epoch_end = saved
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "pspnet-tf train: interrupted after epoch 1; run the same command to resume"
    )
    assert not (output / run_folder.LOCK_FILE).exists()
    code, out, error = run(argv, capsys)
    assert code == 0, error
    assert history_epochs(output) == [0, 1]
    assert optimizer_steps(output) == EPOCHS * STEPS


def test_a_second_train_into_a_busy_run_folder_is_refused(clean_data, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (output / run_folder.LOCK_FILE).write_text(str(other.pid))
        code, _, error = run(train_args(clean_data, output), capsys)
        assert code == 1, error
        assert error == (
            f"pspnet-tf train: error: {output}: another pspnet-tf train (pid {other.pid}) is "
            "writing to this run folder; wait for it to finish, or stop it and rerun"
        )
        assert os.listdir(output) == [run_folder.LOCK_FILE]  # nothing else written
    finally:
        other.kill()
        other.wait()
    # Its process gone, the lock is stale: the same command takes it over and runs.
    code, _, error = run(train_args(clean_data, output), capsys)
    assert code == 0, error
    assert history_epochs(output) == [0, 1] and not (output / run_folder.LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["a file", "a folder of other things"])
def test_train_output_that_is_not_a_run_folder_is_refused(where, clean_data, tmp_path, capsys):
    output = tmp_path / "out"
    if where == "a file":
        output.write_text("mine")
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine")
    code, _, error = run(train_args(clean_data, output), capsys)
    assert code == 1 and f"{output}: exists ({where.replace(' of other things', '')}" in error
    assert "is not a run folder (it has no config.yaml)" in error
    assert (output.read_text() if where == "a file" else os.listdir(output)) in (
        "mine",
        ["notes.txt"],
    )


def test_a_full_disk_before_a_backup_is_one_line_and_the_run_resumes(
    clean_data, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "run"
    argv = train_args(clean_data, output)
    real = shutil.disk_usage
    free = {"bytes": 2**20}  # 1 MB: less than the first backup needs

    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    code, _, error = run(argv, capsys)
    backup = output / "backup" / run_folder.WEIGHTS_FILE
    assert code == 1 and error.startswith(f"pspnet-tf train: error: {backup}: no space left on")
    assert "needs about" in error and "1 MB free" in error, error
    assert not backup.exists() and not hidden_temporaries(output)
    monkeypatch.setattr(shutil, "disk_usage", real)
    code, _, error = run(argv, capsys)
    assert code == 0, error
    assert history_epochs(output) == [0, 1]
