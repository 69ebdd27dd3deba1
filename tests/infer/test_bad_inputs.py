"""What bad input gets: one row per case of the table in docs/bad-input.md.

Each row runs ``pspnet-tf`` in-process and checks the exit code, that an error is ONE
line naming the file or flag (no traceback), the summary of a batch that skipped files,
and that nothing half-written is left in the output folder. A SavedModel's answer to
wrong-dtype arrays is the second table. Wrong rank, channel count and empty images fed
to a SavedModel are test_export.py's ``BAD_INPUTS``.
"""

import dataclasses
import io
import logging
import os
from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pspnet_tf.cli import main as cli_main
from pspnet_tf.infer.export import export_saved_model, load_saved_model
from pspnet_tf.model.layers import Preprocessing

# A pixelwise model (1x1 conv after the preprocessing layer): labels follow each pixel's
# colour, so a 16-bit image scaled wrongly gets other labels, and it loads in a blink.
KERNEL = np.array([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, -2.0]])
BIAS = np.array([0.1, -0.2, 0.05])
MEAN, STD = np.array([100.0, 120.0, 140.0]), np.array([50.0, 60.0, 70.0])
GOOD, BAD = ("a", "b", "c", "x", "y", "z"), ("corrupt", "empty", "trunc")
SIZE = (20, 24)


def numpy_labels(image):
    return (((np.asarray(image, np.float64) - MEAN) / STD) @ KERNEL + BIAS).argmax(-1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    image = keras.Input((None, None, 3))
    x = Preprocessing(MEAN.tolist(), STD.tolist(), "rgb", name="preprocessing")(image)
    conv = keras.layers.Conv2D(3, 1, name="classifier")
    model = keras.Model(image, conv(x))
    conv.set_weights([KERNEL[None, None].astype("float32"), BIAS.astype("float32")])
    path = tmp_path_factory.mktemp("model") / "m.keras"
    model.save(path)
    return str(path)


@pytest.fixture(autouse=True)
def log_to_captured_stderr():
    """A fresh 'pspnet_tf' handler per test, so it writes to this test's captured stderr.

    The logger is made propagating again before the test's call phase: pytest attaches
    its own capture handlers to non-propagating loggers, and ``cli`` adds its handler only
    to a logger without handlers.
    """
    log = logging.getLogger("pspnet_tf")
    saved, propagate = log.handlers[:], log.propagate
    for handler in saved:
        log.removeHandler(handler)
    log.propagate = True
    yield
    for handler in log.handlers[:]:
        log.removeHandler(handler)
    for handler in saved:
        log.addHandler(handler)
    log.propagate = propagate


def _jpeg_bytes(rng):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*SIZE, 3)).astype("uint8")).save(buffer, "JPEG")
    return buffer.getvalue()


def _corrupt(data):
    """A JPEG whose compressed data holds bytes no encoder writes (a reserved marker).

    Pillow decodes it without an error, into garbage pixels. (Damage that keeps the
    marker structure is not caught at all: see pspnet_tf.data.images.)
    """
    data = bytearray(data)
    middle = data.index(b"\xff\xda") + (len(data) - data.index(b"\xff\xda")) // 2
    data[middle : middle + 8] = b"\x12\x34\xff\x2a\x56\x78\x9a\xbc"
    return bytes(data)


def _photos(tmp, rng):
    """tmp/photos: six good JPEGs around a damaged, an empty and a truncated one."""
    folder = tmp / "photos"
    folder.mkdir()
    for name in GOOD:
        (folder / f"{name}.jpg").write_bytes(_jpeg_bytes(rng))
    data = _jpeg_bytes(rng)
    (folder / "corrupt.jpg").write_bytes(_corrupt(data))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "trunc.jpg").write_bytes(data[: len(data) // 2])
    return folder


def _voc(tmp, rng, breaker=None):
    """tmp/voc: VOC pairs p0..p3 (split val); ``breaker(image_path)`` spoils p1's image."""
    root = tmp / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        (root / "JPEGImages" / f"p{i}.jpg").write_bytes(_jpeg_bytes(rng))
        label = rng.integers(0, 3, SIZE).astype("uint8")
        Image.fromarray(label, "L").save(root / "SegmentationClass" / f"p{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("p0\np1\np2\np3\n")
    if breaker:
        breaker(root / "JPEGImages" / "p1.jpg")
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _as_webp_and_tiff(p1):
    Image.open(p1).convert("RGB").save(p1, format="WEBP")
    p2 = p1.with_name("p2.jpg")
    Image.open(p2).convert("RGB").save(p2, format="TIFF")


def _sixteen_bit(tmp, rng):
    folder = tmp / "photos"
    folder.mkdir()
    values = rng.integers(0, 65536, SIZE).astype(np.uint16)
    Image.fromarray(values).save(folder / "deep.png")  # Pillow mode I;16
    return values


@dataclasses.dataclass
class Case:
    """One row: the command, its exit code, its one-line error (parts) or summary (parts)."""

    argv: Callable  # (tmp, model file, rng) -> argv list; makes the files it needs
    code: int
    error: tuple = ()  # parts of the one 'error:' line on stderr
    out: tuple = ()  # parts of stdout
    check: Callable | None = None  # (tmp) -> None, more assertions on the files


def _predict(tmp, model, *extra, inputs=None):
    inputs = inputs or [str(tmp / "photos")]
    return ["predict", "--model", model, "--input", *inputs, "--output", str(tmp / "out"), *extra]


def _tflite_export(tmp, *extra):
    model = str(tmp / "unread.keras")  # never read: the flag is refused first
    return ["export", "--model", model, "--format", "tflite", *extra,
            "--output", str(tmp / "out/m.tflite")]  # fmt: skip


def _written(tmp, stem):
    return [
        (tmp / "out" / "labels" / f"{stem}.png").is_file(),
        (tmp / "out" / "masks" / f"{stem}.png").is_file(),
        (tmp / "out" / "overlays" / f"{stem}.jpg").is_file(),
    ]


def _check_skipped(tmp):
    for stem in GOOD:
        assert _written(tmp, stem) == [True] * 3, stem
    for stem in BAD:
        assert _written(tmp, stem) == [False] * 3, stem


def _check_strict(tmp):
    for stem in ("a", "b", "c"):  # before corrupt.jpg in name order: done
        assert _written(tmp, stem) == [True] * 3
    for stem in ("corrupt", "x", "y", "z"):
        assert _written(tmp, stem) == [False] * 3


def _check_sixteen_bit(tmp):
    values = np.asarray(Image.open(tmp / "photos" / "deep.png"))
    expected = numpy_labels(np.repeat((values >> 8)[..., None], 3, axis=2))
    clipped = numpy_labels(np.repeat(np.clip(values, 0, 255)[..., None], 3, axis=2))
    assert (expected != clipped).mean() > 0.3  # the test can tell the two apart
    labels = np.asarray(Image.open(tmp / "out" / "labels" / "deep.png"))
    np.testing.assert_array_equal(labels, expected)


def _user_folder(tmp):
    """tmp/out/k holding the user's notes.txt, which no command may delete."""
    folder = tmp / "out" / "k"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    return folder


def _notes_kept(tmp):
    assert (tmp / "out" / "k" / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp / "out" / "k") == ["notes.txt"]


def _two_folders_same_name(tmp, rng):
    for folder in ("dirA", "dirB"):
        (tmp / folder).mkdir()
        (tmp / folder / "img.jpg").write_bytes(_jpeg_bytes(rng))
    return [str(tmp / "dirA"), str(tmp / "dirB")]


def _check_mirrored(tmp):
    for folder in ("dirA", "dirB"):
        assert _written(tmp, f"{folder}/img") == [True] * 3
    photos = {
        folder: np.asarray(Image.open(tmp / folder / "img.jpg")) for folder in ("dirA", "dirB")
    }
    for folder, image in photos.items():  # each output belongs to its own input
        labels = np.asarray(Image.open(tmp / "out" / "labels" / folder / "img.png"))
        np.testing.assert_array_equal(labels, numpy_labels(image))


def _broken_model(kind):
    def make(tmp, model, rng):
        path = tmp / f"{kind}.keras"
        if kind == "truncated":
            path.write_bytes(open(model, "rb").read()[:3000])
        else:
            path.write_text("this is not a model\n")
        return str(path)

    return make


def _evaluate(tmp, model, rng, *extra, breaker=_truncate):
    root = _voc(tmp, rng, breaker)
    return [
        "evaluate", "--model", model, "--data", str(root), "--layout", "voc",
        "--json", str(tmp / "out" / "report.json"), *extra,
    ]  # fmt: skip


UNREADABLE = "not a readable .keras file (truncated or not a Keras model)"
REFUSED = "{tmp}/out/k: exists (a folder holding notes.txt) and is not "
# The bad-flag rows name a model that does not exist: the flag must fail before it is read.
CASES = {
    "truncated .keras, predict": Case(
        lambda tmp, model, rng: (
            _photos(tmp, rng),
            _predict(tmp, _broken_model("truncated")(tmp, model, rng)),
        )[1],
        1,
        ("pspnet-tf predict: error: model '{tmp}/truncated.keras': " + UNREADABLE,),
    ),
    "text file named .keras, evaluate": Case(
        lambda tmp, model, rng: _evaluate(tmp, _broken_model("text")(tmp, model, rng), rng),
        1,
        ("pspnet-tf evaluate: error: model '{tmp}/text.keras': " + UNREADABLE,),
    ),
    "truncated .keras, export": Case(
        lambda tmp, model, rng: [
            "export",
            "--model",
            _broken_model("truncated")(tmp, model, rng),
            "--output",
            str(tmp / "out" / "sm"),
        ],
        1,
        ("pspnet-tf export: error: model '{tmp}/truncated.keras': " + UNREADABLE,),
    ),
    "missing model": Case(
        lambda tmp, model, rng: (_photos(tmp, rng), _predict(tmp, str(tmp / "nowhere.keras")))[1],
        1,
        ("pspnet-tf predict: error: model '{tmp}/nowhere.keras': no such file",),
    ),
    "missing input among several": Case(
        lambda tmp, model, rng: _predict(
            tmp, model, inputs=[str(_photos(tmp, rng) / "a.jpg"), str(tmp / "gone.jpg")]
        ),
        1,
        ("pspnet-tf predict: error: input '{tmp}/gone.jpg': no such file or folder",),
    ),
    "empty, truncated and damaged JPEGs in a predict folder": Case(
        lambda tmp, model, rng: (_photos(tmp, rng), _predict(tmp, model))[1],
        1,
        out=(
            "wrote 18 files to {tmp}/out: 6 of 9 images; skipped: {tmp}/photos/corrupt.jpg "
            "(corrupt data), {tmp}/photos/empty.jpg (empty file), {tmp}/photos/trunc.jpg "
            "(truncated)",
        ),
        check=_check_skipped,
    ),
    "predict --strict stops at the first bad image": Case(
        lambda tmp, model, rng: (_photos(tmp, rng), _predict(tmp, model, "--strict"))[1],
        1,
        ("pspnet-tf predict: error: image '{tmp}/photos/corrupt.jpg': corrupt data",),
        check=_check_strict,
    ),
    "16-bit grayscale PNG is scaled, not clipped": Case(
        lambda tmp, model, rng: (_sixteen_bit(tmp, rng), _predict(tmp, model))[1],
        0,
        out=("wrote 3 files to {tmp}/out: 1 of 1 images",),
        check=_check_sixteen_bit,
    ),
    "check-data with a 0-byte image": Case(
        lambda tmp, model, rng: [
            "check-data",
            "--data",
            str(_voc(tmp, rng, lambda p: p.write_bytes(b""))),
            "--layout",
            "voc",
            "--num-classes",
            "3",
            "--split",
            "val",
        ],
        1,
        out=(
            "{tmp}/voc/JPEGImages/p1.jpg: unreadable or truncated image (empty file)",
            "checked 4 image/label pairs (val): 1 problems",
        ),
    ),
    "check-data names every WebP or TIFF named .jpg": Case(
        lambda tmp, model, rng: [
            "check-data",
            "--data",
            str(_voc(tmp, rng, _as_webp_and_tiff)),
            "--layout",
            "voc",
            "--num-classes",
            "3",
            "--split",
            "val",
        ],  # fmt: skip
        1,
        out=(
            "{tmp}/voc/JPEGImages/p1.jpg: not a JPEG, PNG, BMP or GIF file (training decodes",
            "{tmp}/voc/JPEGImages/p2.jpg: not a JPEG, PNG, BMP or GIF file (training decodes",
            "checked 4 image/label pairs (val): 2 problems",
        ),
    ),
    "evaluate skips a truncated image": Case(
        _evaluate,
        1,
        out=(
            "single evaluation on 3 images",
            "evaluated 3 of 4 images; skipped: {tmp}/voc/JPEGImages/p1.jpg (truncated)",
        ),
        check=lambda tmp: (tmp / "out" / "report.json").is_file(),
    ),
    "evaluate --strict refuses a truncated image": Case(
        lambda tmp, model, rng: _evaluate(tmp, model, rng, "--strict"),
        1,
        (
            "pspnet-tf evaluate: error: {tmp}/voc/JPEGImages/p1.jpg: unreadable or truncated "
            "image (truncated)",
        ),
        check=lambda tmp: not (tmp / "out").exists() or not os.listdir(tmp / "out"),
    ),
    "evaluate --crop-size 0": Case(
        lambda tmp, model, rng: _evaluate(
            tmp, str(tmp / "unread.keras"), rng, "--mode", "sliding", "--crop-size", "0"
        ),
        2,
        ("pspnet-tf evaluate: error: --crop-size must be positive, got 0",),
    ),
    "predict --mode unknown": Case(
        lambda tmp, model, rng: _predict(tmp, model, "--mode", "fancy"),
        2,
        ("pspnet-tf predict: error: argument --mode: invalid choice: 'fancy'",),
    ),
    "predict --crop-size 1 2 3": Case(
        lambda tmp, model, rng: (
            _photos(tmp, rng),
            _predict(tmp, str(tmp / "unread.keras"), "--mode", "sliding", "--crop-size", *"123"),
        )[1],
        2,
        ("pspnet-tf predict: error: --crop-size: expected a size H or H W, got 1 2 3",),
    ),
    "predict --alpha 2": Case(
        lambda tmp, model, rng: _predict(tmp, model, "--alpha", "2"),
        2,
        ("pspnet-tf predict: error: --alpha must be in [0, 1], got 2.0",),
    ),
    "export tflite without --input-size": Case(
        lambda tmp, model, rng: _tflite_export(tmp),
        2,
        ("pspnet-tf export: error: --format tflite needs --input-size H [W]",),
    ),
    "export into a folder of the user's files": Case(
        lambda tmp, model, rng: (
            _user_folder(tmp),
            ["export", "--model", model, "--output", str(tmp / "out" / "k")],
        )[1],
        1,
        ("pspnet-tf export: error: " + REFUSED + "a SavedModel folder; refusing to replace it",),
        check=_notes_kept,
    ),
    "export tflite onto a folder of the user's files": Case(
        lambda tmp, model, rng: (
            _user_folder(tmp),
            [
                "export",
                "--model",
                model,
                "--format",
                "tflite",
                "--input-size",
                "8",
                "--output",
                str(tmp / "out" / "k"),
            ],
        )[1],  # fmt: skip
        1,
        ("pspnet-tf export: error: " + REFUSED + "a TFLite model",),
        check=_notes_kept,
    ),
    "evaluate --json onto a folder": Case(
        lambda tmp, model, rng: (
            _user_folder(tmp),
            _evaluate(tmp, model, rng, "--json", str(tmp / "out" / "k"), breaker=None),
        )[1],
        1,
        ("pspnet-tf evaluate: error: " + REFUSED + "an evaluation report",),
        check=_notes_kept,
    ),
    "evaluate --json onto a file that is not a report": Case(
        lambda tmp, model, rng: (
            _user_folder(tmp),
            _evaluate(
                tmp, model, rng, "--json", str(tmp / "out" / "k" / "notes.txt"), breaker=None
            ),
        )[1],
        1,
        (
            "pspnet-tf evaluate: error: {tmp}/out/k/notes.txt: exists (a file) and is not an "
            "evaluation report",
        ),  # fmt: skip
        check=_notes_kept,
    ),
    "predict --output an existing file": Case(
        lambda tmp, model, rng: (
            _photos(tmp, rng),
            (tmp / "out").write_text("mine"),
            _predict(tmp, str(tmp / "unread.keras")),
        )[2],
        1,
        ("pspnet-tf predict: error: {tmp}/out: exists (a file) and is not a folder",),
        check=lambda tmp: (tmp / "out").read_text() == "mine",
    ),
    "predict: two folders holding the same file name": Case(
        lambda tmp, model, rng: _predict(tmp, model, inputs=_two_folders_same_name(tmp, rng)),
        0,
        out=("wrote 6 files to {tmp}/out: 2 of 2 images",),
        check=_check_mirrored,
    ),
    "predict: the same image twice": Case(
        lambda tmp, model, rng: (
            _photos(tmp, rng),
            _predict(tmp, model, inputs=[str(tmp / "photos" / "a.jpg")] * 2),
        )[1],
        1,
        ("pspnet-tf predict: error: input given twice: {tmp}/photos/a.jpg",),
    ),
    "evaluate --num-classes other than the model's": Case(
        lambda tmp, model, rng: _evaluate(tmp, model, rng, "--num-classes", "10", breaker=None),
        2,
        (
            "pspnet-tf evaluate: error: --num-classes 10 does not match the model, which gives 3 "
            "classes",
        ),  # fmt: skip
    ),
    "export --input-size 0": Case(
        lambda tmp, model, rng: _tflite_export(tmp, "--input-size", "0"),
        2,
        ("pspnet-tf export: error: --input-size must be positive, got 0",),
    ),
}


def _run(argv):
    try:
        return cli_main(argv)
    except SystemExit as exit:  # argparse's own errors (unknown choice, missing flag)
        return exit.code


def _leftovers(folder):
    """Temporaries and hidden files anywhere under ``folder``: a writer was cut short."""
    found = []
    for _, folders, files in os.walk(folder):
        found += [n for n in folders + files if n.startswith(".") or ".tmp" in n]
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, model_file, tmp_path, capsys):
    case = CASES[name]
    argv = case.argv(tmp_path, model_file, np.random.default_rng(0))
    code = _run(argv)
    out, err = capsys.readouterr()
    assert code == case.code, (out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    if case.error:
        assert len(errors) == 1, err
        for part in case.error:
            assert part.format(tmp=tmp_path) in errors[0], err
    else:
        assert errors == [], err
    for part in case.out:
        assert part.format(tmp=tmp_path) in out, out
    if case.check:
        assert case.check(tmp_path) is not False
    assert _leftovers(tmp_path) == []


def test_skipped_images_are_each_named_in_a_warning(model_file, tmp_path, capsys):
    _photos(tmp_path, np.random.default_rng(0))
    assert _run(_predict(tmp_path, model_file)) == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert warnings == [
        f"pspnet-tf: skipped image '{tmp_path}/photos/{name}.jpg': {reason}"
        for name, reason in zip(BAD, ("corrupt data", "empty file", "truncated"), strict=True)
    ]


def test_sixteen_bit_image_is_said_once_naming_the_file(model_file, tmp_path, capsys):
    _sixteen_bit(tmp_path, np.random.default_rng(0))
    assert _run(_predict(tmp_path, model_file)) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "16-bit" in line]
    assert lines == [
        f"pspnet-tf: {tmp_path}/photos/deep.png: 16-bit image scaled to 8 bits (value >> 8)"
    ]


# A SavedModel fed the wrong dtype: (array, words of the error).
WRONG_DTYPES = {
    "float64 0.5": (np.full((1, 8, 8, 3), 0.5), "got float64"),
    "int64 300": (np.full((1, 8, 8, 3), 300, np.int64), "got int64"),
    "float64 -1": (np.full((1, 8, 8, 3), -1.0), "got float64"),
    "float32 tensor": (tf.zeros((1, 8, 8, 3)), "got float32"),
    "python list": ([[[[1, 2, 3]]]], "got list"),
}


@pytest.fixture(scope="module")
def saved_model(model_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "sm"
    export_saved_model(keras.models.load_model(model_file, compile=False), path)
    return path


@pytest.mark.parametrize("name", list(WRONG_DTYPES))
def test_saved_model_refuses_wrong_dtypes(saved_model, name):
    images, words = WRONG_DTYPES[name]
    serve = load_saved_model(saved_model)
    with pytest.raises(ValueError, match=f"images must be uint8 RGB 0-255, {words}"):
        serve(images)


def test_saved_model_serves_uint8_arrays(saved_model):
    image = np.random.default_rng(3).integers(0, 256, (1, *SIZE, 3)).astype("uint8")
    labels = load_saved_model(saved_model)(image)["labels"].numpy()
    np.testing.assert_array_equal(labels[0], numpy_labels(image[0]))


def test_export_to_the_current_folder_deletes_nothing(model_file, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert _run(["export", "--model", model_file, "--output", "."]) == 1
    err = capsys.readouterr().err
    assert f"pspnet-tf export: error: {work}: exists (a folder holding mine.txt)" in err
    assert os.listdir(work) == ["mine.txt"]


def test_a_previous_export_is_replaced_whole(model_file, tmp_path, capsys):
    """An earlier SavedModel (its contents recognised) is replaced; a killed export's
    hidden temporary is cleaned up by the next run."""
    target = tmp_path / "sm"
    assert _run(["export", "--model", model_file, "--output", str(target)]) == 0
    stale = tmp_path / ".sm.tmp999999999"  # a dead writer's pid
    (stale / "variables").mkdir(parents=True)
    first = (target / "saved_model.pb").stat().st_mtime_ns
    assert _run(["export", "--model", model_file, "--output", str(target)]) == 0
    assert (target / "saved_model.pb").stat().st_mtime_ns != first
    assert sorted(os.listdir(tmp_path)) == ["sm"]
    image = np.random.default_rng(1).integers(0, 256, (1, *SIZE, 3)).astype("uint8")
    labels = load_saved_model(target)(image)["labels"].numpy()
    np.testing.assert_array_equal(labels[0], numpy_labels(image[0]))


def test_other_files_in_an_input_folder_are_each_named(model_file, tmp_path, capsys):
    folder = _photos(tmp_path, np.random.default_rng(0))
    frames = [Image.new("RGB", SIZE[::-1], c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "clip.mp4").write_bytes(b"")
    _run(_predict(tmp_path, model_file))
    lines = [
        line for line in capsys.readouterr().err.splitlines() if "anim" in line or "clip" in line
    ]
    assert lines[0].startswith(f"pspnet-tf: skipped {folder}/anim.gif (not an image type read;")
    assert lines[1].startswith(f"pspnet-tf: skipped {folder}/clip.mp4 (a video: give it alone")
    assert len(lines) == 2
