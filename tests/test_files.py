import json
import os
import subprocess
import sys

import pytest

from pspnet_tf.files import (
    ANY_FILE,
    PNG,
    OutputExistsError,
    OutputKind,
    atomic_path,
    check_output,
    remove_stale_temporaries,
    write_json,
    write_text,
)


def test_atomic_path_renames_on_success_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "sub" / "out.png"
    with atomic_path(target) as temporary:
        assert temporary.endswith(".png") and os.path.basename(temporary).startswith(".")
        assert os.path.dirname(temporary) == str(tmp_path / "sub")
        with open(temporary, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path / "sub") == ["out.png"]


def test_atomic_path_leaves_the_old_file_on_an_exception(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        with open(temporary, "w") as f:
            f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


# A folder kind that recognises its own outputs by a marker file.
MARKED = OutputKind("a marked folder", lambda p: os.path.isfile(os.path.join(p, "MARK")))


def test_atomic_path_replaces_a_folder_only_when_the_kind_recognises_it(tmp_path):
    target = tmp_path / "saved"
    (target / "old").mkdir(parents=True)
    (target / "MARK").write_text("")
    with atomic_path(target, MARKED) as temporary:
        os.makedirs(os.path.join(temporary, "new"))
    assert os.listdir(target) == ["new"]
    assert os.listdir(tmp_path) == ["saved"]


@pytest.mark.parametrize("kind", [ANY_FILE, MARKED, PNG])
def test_atomic_path_refuses_a_folder_of_other_things_and_leaves_it(tmp_path, kind):
    target = tmp_path / "k"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"k: exists \(a folder holding notes.txt\)"):
        with atomic_path(target, kind) as temporary:
            os.makedirs(temporary)
    assert (target / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["k"]


def test_atomic_path_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError, match="mine.txt"), atomic_path(".", MARKED):
        pass
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_a_file_is_replaced_only_if_it_is_of_the_writers_kind(tmp_path):
    png, text = tmp_path / "a.png", tmp_path / "b.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nold")
    text.write_text("not a picture")
    write_text(png, "\x89PNG\r\n\x1a\nnew", PNG)
    assert png.read_text().endswith("new")
    with pytest.raises(OutputExistsError, match=r"b.png: exists \(a file\) and is not a PNG"):
        write_text(text, "x", PNG)
    assert text.read_text() == "not a picture"


def test_a_parent_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputExistsError, match=r"f is a file, not a folder"):
        check_output(tmp_path / "f" / "sub" / "out.png")


def test_a_killed_writers_temporary_of_the_same_target_is_cleaned(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".model.tmp{int(child.stdout)}"
    stale.mkdir()
    other = tmp_path / f".other.tmp{int(child.stdout)}"
    other.mkdir()
    with atomic_path(tmp_path / "model", MARKED) as temporary:
        os.makedirs(temporary)
    assert sorted(os.listdir(tmp_path)) == sorted(["model", other.name])


def test_write_text_and_json(tmp_path):
    write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    write_json(tmp_path / "b.json", {"x": [1, 2]})
    text = (tmp_path / "b.json").read_text()
    assert json.loads(text) == {"x": [1, 2]} and text.endswith("\n")


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    # A pid that has certainly exited: a child we waited for.
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(child.stdout)
    stale_file = tmp_path / f".model.tmp{dead}.keras"
    stale_file.write_text("half")
    stale_folder = tmp_path / f".saved.tmp{dead}"
    stale_folder.mkdir()
    live = tmp_path / f".last.tmp{os.getpid()}.keras"  # this process: still writing
    live.write_text("busy")
    keep = [tmp_path / "model.keras", tmp_path / ".hidden.keras", tmp_path / ".x.tmpabc"]
    for path in keep:
        path.write_text("keep")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([str(stale_file), str(stale_folder)])
    assert sorted(os.listdir(tmp_path)) == sorted([live.name] + [p.name for p in keep])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_keras_weights_temporaries_keep_their_suffix_and_are_cleaned(tmp_path):
    # Keras' save_weights refuses a name that does not end in ".weights.h5".
    with atomic_path(tmp_path / "latest.weights.h5") as temporary:
        assert temporary.endswith(".weights.h5") and ".tmp" in temporary
        stale = tmp_path / os.path.basename(temporary).replace(str(os.getpid()), "999999999")
        stale.write_text("half")
        with open(temporary, "w") as f:
            f.write("weights")
    assert (tmp_path / "latest.weights.h5").read_text() == "weights"
    assert remove_stale_temporaries(tmp_path) == [str(stale)]


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("Unable to write: No space left")],
    ids=["errno", "library text"],
)
def test_a_full_disk_is_one_line_naming_the_path(tmp_path, error):
    target = tmp_path / "model.keras"
    with pytest.raises(OSError, match=r"model.keras: no space left on the device \(\d+ MB free"):
        with atomic_path(target) as temporary:
            open(temporary, "w").write("half")
            raise error
    assert os.listdir(tmp_path) == []


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission check itself is what is exercised.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"{tmp_path}/out/m.tflite: cannot be written, "):
        check_output(tmp_path / "out" / "m.tflite")
