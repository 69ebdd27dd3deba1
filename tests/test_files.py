import json
import os
import subprocess
import sys

import pytest

from pspnet_tf.files import atomic_path, remove_stale_temporaries, write_json, write_text


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


def test_atomic_path_replaces_a_folder(tmp_path):
    target = tmp_path / "saved"
    (target / "old").mkdir(parents=True)
    with atomic_path(target) as temporary:
        os.makedirs(os.path.join(temporary, "new"))
    assert os.listdir(target) == ["new"]
    assert os.listdir(tmp_path) == ["saved"]


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
