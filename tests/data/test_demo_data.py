"""The generated demo dataset: deterministic, VOC layout, and not solvable by colour alone."""

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pspnet_tf.data.checks import check_dataset
from pspnet_tf.data.demo import DEMO_CLASSES, colour_cue, make_demo_dataset, render_scene
from pspnet_tf.data.pipeline import load_dataset
from pspnet_tf.metrics import scores_from_confusion


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                found[os.path.relpath(os.path.join(folder, name), root)] = file.read()
    return found


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = make_demo_dataset(tmp_path / "a", num_train=3, num_val=2, size=(40, 56), seed=4)
    again = make_demo_dataset(tmp_path / "b", num_train=3, num_val=2, size=(40, 56), seed=4)
    other = make_demo_dataset(tmp_path / "c", num_train=3, num_val=2, size=(40, 56), seed=5)
    assert _files(first) == _files(again)
    assert (
        _files(first)["JPEGImages/train_00000.jpg"] != _files(other)["JPEGImages/train_00000.jpg"]
    )
    assert sorted(_files(first)) == sorted(
        ["demo.json", "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"]
        + [f"JPEGImages/{s}_{i:05d}.jpg" for s, n in (("train", 3), ("val", 2)) for i in range(n)]
        + [
            f"SegmentationClass/{s}_{i:05d}.png"
            for s, n in (("train", 3), ("val", 2))
            for i in range(n)
        ]
    )


def test_reads_as_a_clean_voc_dataset(demo_dataset):
    n = len(DEMO_CLASSES)
    assert DEMO_CLASSES[0] == "background"
    assert Image.open(os.path.join(demo_dataset, "SegmentationClass", "val_00000.png")).mode == "P"
    assert check_dataset(demo_dataset, "voc", "train", n) == []
    assert check_dataset(demo_dataset, "voc", "val", n) == []
    images = [x for x, _ in load_dataset(demo_dataset, "voc", "val", n)]
    assert len(images) == 4 and images[0].shape == (1, 64, 64, 3)


def test_scenes_hold_every_class_and_ignore_bands():
    labels = [render_scene(np.random.default_rng(i), (96, 96))[1] for i in range(20)]
    values = np.concatenate([label.ravel() for label in labels])
    assert set(np.unique(values)) == set(range(len(DEMO_CLASSES))) | {255}
    ignore = (values == 255).mean()
    assert 0.005 < ignore < 0.1
    # Shapes vary in size: the object-pixel share differs from scene to scene.
    shares = [(label[label != 255] > 0).mean() for label in labels]
    assert np.std(shares) > 0.05


def _colour_vote_scores(difficulty):
    """Scores of a per-colour majority vote (512 colour bins) learnt on 40 scenes, on 20 others."""

    def scenes(split, count):
        rng = [np.random.default_rng((9, split, i)) for i in range(count)]
        return [render_scene(r, (96, 96), difficulty) for r in rng]

    def bins(image):
        return (image // 32).astype(np.int64) @ np.array([64, 8, 1])

    n = len(DEMO_CLASSES)
    votes = np.zeros((512, n))
    for image, label in scenes(0, 40):
        keep = label != 255
        np.add.at(votes, (bins(image)[keep], label[keep]), 1)
    confusion = np.zeros((n, n))
    for image, label in scenes(1, 20):
        keep = label != 255
        np.add.at(confusion, (label[keep], votes.argmax(1)[bins(image)[keep]]), 1)
    return scores_from_confusion(confusion)


def test_colour_alone_does_not_tell_the_classes_apart():
    """From difficulty 0.5 (the default) a per-colour vote scores far below a shape-aware model."""
    scores = _colour_vote_scores(0.5)
    assert scores["miou"] < 0.25
    assert max(scores["per_class_iou"][1:]) < 0.15  # no shape is recognisable by colour


def test_easy_scenes_give_colour_as_a_partial_cue():
    assert colour_cue(0.0) == 1.0 and colour_cue(0.2) == pytest.approx(0.6)
    assert colour_cue(0.5) == colour_cue(0.9) == 0.0
    # Hue tells the classes apart only beside the background's random colour: a per-pixel
    # colour vote gains from the cue but stays far below what the demo's model reaches (0.6).
    easy = _colour_vote_scores(0.0)["miou"]
    assert _colour_vote_scores(0.5)["miou"] + 0.05 < easy < 0.3


def test_difficulty_changes_the_scenes():
    def ignore_share(difficulty):
        labels = [
            render_scene(np.random.default_rng(i), (64, 64), difficulty)[1] for i in range(10)
        ]
        return np.mean([(label == 255).mean() for label in labels])

    # Harder scenes: more, smaller shapes, hence more boundary (ignore) pixels.
    assert ignore_share(1.0) > 1.3 * ignore_share(0.0)


def test_existing_folders(tmp_path):
    root = make_demo_dataset(tmp_path / "d", num_train=2, num_val=1, size=32)
    stamp = os.path.getmtime(os.path.join(root, "demo.json"))
    assert make_demo_dataset(root, num_train=2, num_val=1, size=32) == root
    assert os.path.getmtime(os.path.join(root, "demo.json")) == stamp  # reused, not rewritten
    make_demo_dataset(root, num_train=3, num_val=1, size=32)  # other arguments: replaced
    assert len(os.listdir(os.path.join(root, "JPEGImages"))) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_demo_dataset(tmp_path / "mine", num_train=1, num_val=1, size=32)
    assert sorted(os.listdir(tmp_path)) == ["d", "mine"]  # no staging folder left behind


def test_small_shapes_are_more_smaller_and_whole():
    def stats(shapes):
        labels = [
            render_scene(np.random.default_rng(i), (160, 160), 0.0, shapes)[1] for i in range(12)
        ]
        regions = [
            cv2.connectedComponents((lab % 255 > 0).astype(np.uint8))[0] - 1 for lab in labels
        ]
        edges = [np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]) for lab in labels]
        cut = np.mean([(edge % 255 > 0).mean() for edge in edges])  # shape pixels on the frame
        return np.mean(regions), cut

    large_regions, large_cut = stats("large")
    small_regions, small_cut = stats("small")
    assert small_regions > 2 * large_regions  # more separate objects per scene
    assert small_cut < large_cut / 4  # easy small scenes keep their shapes (nearly) whole
    with pytest.raises(ValueError, match="shapes must be one of"):
        render_scene(np.random.default_rng(0), (32, 32), shapes="tiny")
