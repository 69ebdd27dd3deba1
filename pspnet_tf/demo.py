"""The main job: ``pspnet-tf demo``, PSPNet end to end on a generated dataset.

One run, on the CPU, with nothing to download:

1. writes the demo dataset (:func:`pspnet_tf.data.demo.make_demo_dataset`, VOC layout);
2. builds PSPNet-MobileNetV2 at 320x320 (the 320 row of the pyramid table: bins
   1, 2, 4, 8) with the auxiliary head;
3. trains it with ``model.fit`` on the ``tf.data`` pipeline, CE + dice loss and the
   paper's poly learning rate schedule (with AdamW: from scratch it needs far fewer steps
   than SGD), with checkpoints and resume (:func:`pspnet_tf.training.recipe.train`);
4. evaluates the validation split single-scale and with sliding windows;
5. draws overlays of validation images beside their ground truth, the training curves
   and the confusion matrix (PNG files);
6. exports a SavedModel, reloads it and checks that it labels an image of another size
   as the Keras model does; exports a full-integer int8 LiteRT model (calibrated on
   training images) and prints what it costs: mIoU, labels equal to Keras, latency, size;
7. prints where everything is, and writes ``summary.json``.

Rerunning into the same folder resumes an interrupted run; a finished run is reused
(its model is evaluated again). The settings below are the library's ordinary options,
chosen so that the default run finishes in minutes on 2 cores (README, "The demo").
"""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np

from pspnet_tf.files import check_output, folder_kind, write_json

# The demo's settings: dataset, model and training recipe (printed in the summary). Trained
# from scratch (nothing to download), so AdamW with the poly schedule, not the paper's SGD for
# fine-tuning ImageNet weights; mild scale augmentation only, since the generated scenes
# already vary in size and rotation. Many small shapes per scene and difficulty 0.1 (a
# partial colour cue, see pspnet_tf.data.demo) make 0.6 val mIoU reachable in 12 epochs on
# 2 cores; with the generator's large shapes and no cue it reached 0.28 after 8 epochs.
_RECIPE = {
    "backbone": "mobilenetv2", "alpha": 0.35, "crop_size": 320, "loss": "ce+dice",
    "optimizer": "adamw", "learning_rate": 0.006, "scale_range": [0.8, 1.25],
    "max_rotation": 0.0, "blur": False, "aux_head": True, "seed": 0,
}  # fmt: skip
SETTINGS = {
    "default": {
        "dataset": {"num_train": 240, "num_val": 48, "size": 320, "seed": 0, "difficulty": 0.1,
                    "shapes": "small"},
        "train": {**_RECIPE, "batch_size": 8, "epochs": 12, "warmup_steps": 20},
        "sliding_crop": 224,
    },
    "quick": {
        "dataset": {"num_train": 64, "num_val": 16, "size": 320, "seed": 0, "difficulty": 0.0,
                    "shapes": "small"},
        # 13 epochs: fewer end where the validation mIoU still climbs steeply.
        "train": {
            **_RECIPE, "batch_size": 4, "epochs": 13, "warmup_steps": 8, "learning_rate": 0.01,
        },
        "sliding_crop": 224,
    },
}  # fmt: skip
# The demo writes into an empty folder or one of its earlier runs, never among other files.
DEMO_FOLDER = folder_kind(
    "a demo folder (it has none of summary.json, data/demo.json, run/config.yaml)",
    "summary.json", "data/demo.json", "run/config.yaml",
)  # fmt: skip
OVERLAY_IMAGES = 4
OTHER_SIZE = (272, 400)  # the SavedModel check uses an image of neither the training size


def run_demo(output="pspnet_demo", quick=False, verbose=1):
    """Runs the demo end to end; returns the summary dict (also in ``summary.json``).

    Args:
        output: str. Folder for the dataset, the run, pictures and exports.
        quick: bool. A smaller dataset and schedule (about 3 minutes on 2 cores).
        verbose: int. 1 shows Keras progress bars, 0 only the summary lines.

    Returns:
        dict with the settings, wall time, validation scores per mode and file paths.
    """
    from pspnet_tf.data import demo as demo_data
    from pspnet_tf.data.pipeline import load_dataset
    from pspnet_tf.infer.evaluation import (
        evaluate,
        format_report,
        plot_confusion_matrix,
        write_json_report,
    )
    from pspnet_tf.infer.predictor import as_predictor
    from pspnet_tf.training.recipe import train

    start = time.perf_counter()
    settings = SETTINGS["quick" if quick else "default"]
    output = os.path.abspath(output)
    check_output(output, DEMO_FOLDER)
    paths = _paths(output)
    _say(f"[1/7] demo dataset -> {paths['data']}")
    demo_data.make_demo_dataset(paths["data"], **settings["dataset"])
    num_classes = len(demo_data.DEMO_CLASSES)
    _say("[2-3/7] PSPNet-MobileNetV2 at 320x320 with aux head: training with model.fit")
    train(
        data=paths["data"], layout="voc", num_classes=num_classes,
        class_names=list(demo_data.DEMO_CLASSES), output=paths["run"],
        verbose=verbose, **settings["train"],
    )  # fmt: skip
    import keras

    model = keras.models.load_model(paths["model"])
    predictor = as_predictor(model)  # one for every step below
    val = load_dataset(paths["data"], "voc", "val", num_classes, batch_size=1)
    reports = {}
    for mode, options in (("single", {}), ("sliding", {"crop_size": settings["sliding_crop"]})):
        _say(f"[4/7] evaluating the validation split ({mode})")
        reports[mode] = evaluate(predictor, val, num_classes, mode=mode, verbose=verbose, **options)
        print(format_report(reports[mode]))
        write_json_report(reports[mode], paths[f"report_{mode}"])
    _say("[5/7] pictures")
    plot_confusion_matrix(reports["single"], paths["confusion"])
    _plot_overlays(predictor, val, paths["overlays"])
    _plot_curves(os.path.join(paths["run"], "history.csv"), paths["curves"])
    _say("[6/7] exports: SavedModel, reloaded and checked")
    agreement = _export_and_check(
        model, predictor, paths["saved_model"], settings["dataset"]["seed"]
    )
    _say("[6/7] exports: LiteRT int8, and what it costs")
    litert = _litert_int8(model, predictor, paths, val)
    summary = {
        "settings": settings,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "val_miou": {mode: report["miou"] for mode, report in reports.items()},
        "val_pixel_accuracy": {m: r["pixel_accuracy"] for m, r in reports.items()},
        "majority_class_miou": _majority_miou(reports["single"]),
        "saved_model_label_agreement": agreement,
        "litert_int8": litert,
        "paths": paths,
    }
    write_json(paths["summary"], summary)
    _print_summary(summary)
    return summary


def _paths(output):
    join = os.path.join
    return {
        "output": output, "data": join(output, "data"), "run": join(output, "run"),
        "model": join(output, "run", "model.keras"),
        "overlays": join(output, "overlays.png"), "curves": join(output, "curves.png"),
        "confusion": join(output, "confusion_matrix.png"),
        "saved_model": join(output, "saved_model"), "summary": join(output, "summary.json"),
        "litert": join(output, "model_int8.tflite"),
        "report_single": join(output, "report_single.json"),
        "report_sliding": join(output, "report_sliding.json"),
    }  # fmt: skip


def _say(message):
    print(f"\n== {message}", flush=True)


def _majority_miou(report):
    """mIoU of predicting the most frequent true class everywhere (a floor to beat)."""
    confusion = np.asarray(report["confusion_matrix"], np.float64)
    truth = confusion.sum(axis=1)
    majority = int(np.argmax(truth))
    return float(truth[majority] / truth.sum() / np.count_nonzero(truth))


def _plot_overlays(predictor, dataset, path):
    """Rows of validation images: image, ground truth, prediction overlaid."""
    from pspnet_tf.data.classes import resolve_classes
    from pspnet_tf.infer.pictures import add_legend, colorize, overlay, save_image
    from pspnet_tf.infer.predict import predict_image

    num_classes = predictor.num_classes
    names, palette, _ = resolve_classes(
        num_classes, model=(predictor.class_names, predictor.palette)
    )
    palette = np.asarray(palette, np.uint8)
    rows = []
    for images, labels in dataset.take(OVERLAY_IMAGES):
        image, label = images[0].numpy(), labels[0].numpy()
        predicted = predict_image(predictor, image)
        rows.append(
            np.concatenate(
                [
                    image.astype(np.uint8),
                    colorize(label, palette),
                    overlay(image, predicted, palette),
                ],
                axis=1,
            )
        )
    save_image(add_legend(np.concatenate(rows, axis=0), names, palette), path)


def _plot_curves(history_csv, path):
    """Training loss, validation mIoU and learning rate per epoch, from the CSV log."""
    from matplotlib.figure import Figure

    with open(history_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure = Figure(figsize=(12, 3.5), dpi=90)
    for index, (keys, title) in enumerate(
        [
            (("loss", "val_loss"), "loss"),
            (("val_main_crop_miou",), "val mIoU at the crop size"),
            (("learning_rate",), "learning rate"),
        ]  # fmt: skip
    ):
        axes = figure.add_subplot(1, 3, index + 1)
        for key in keys:
            if rows and key in rows[0]:
                axes.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _export_and_check(model, predictor, path, seed):
    """Exports a SavedModel; returns the label agreement with Keras (``predictor``) on an
    image of another size."""
    from pspnet_tf.data.demo import render_scene
    from pspnet_tf.infer.export import export_saved_model, saved_model_agreement

    export_saved_model(model, path)
    image, _ = render_scene(np.random.default_rng(seed + 1), OTHER_SIZE)
    agreement = saved_model_agreement(predictor, path, [image])
    if agreement < 0.999:
        raise RuntimeError(f"the SavedModel at {path} disagrees with Keras on {1 - agreement:.2%}")
    return agreement


def _litert_int8(model, predictor, paths, val):
    """Exports the int8 LiteRT model at the training size, calibrated on training images;
    prints and returns :func:`pspnet_tf.infer.evaluation.compare`'s rows (with sizes)."""
    from pspnet_tf.data.images import read_rgb
    from pspnet_tf.data.layouts import list_pairs
    from pspnet_tf.infer.evaluation import compare, format_comparison
    from pspnet_tf.infer.litert import LiteRTPredictor, export_litert
    from pspnet_tf.model.network import get_metadata

    size = tuple(get_metadata(model).get("crop_size") or (320, 320))
    train_images = [read_rgb(image) for image, _ in list_pairs(paths["data"], "voc", "train")]
    export_litert(model, paths["litert"], size, "int8", calibration=train_images)
    lite = LiteRTPredictor(paths["litert"])
    rows = compare({"Keras float32": predictor, "LiteRT int8": lite}, val)
    files = {"Keras float32": paths["model"], "LiteRT int8": paths["litert"]}
    sizes = {name: os.path.getsize(path) for name, path in files.items()}
    print(format_comparison(rows, sizes))
    return [{**row, "size_bytes": sizes[row["name"]]} for row in rows]


def _print_summary(summary):
    s = summary["settings"]
    print("\n== [7/7] demo finished in", f"{summary['wall_time_s']:.0f} s")
    print("settings:", json.dumps(s["train"]), "dataset:", json.dumps(s["dataset"]))
    for mode, value in summary["val_miou"].items():
        print(f"val mIoU ({mode}): {value:.3f}")
    print(f"majority-class mIoU: {summary['majority_class_miou']:.3f}")
    print(f"SavedModel labels agree with Keras on {summary['saved_model_label_agreement']:.2%}")
    keras_row, lite = summary["litert_int8"]
    print(f"LiteRT int8: val mIoU {lite['miou']:.3f} (Keras {keras_row['miou']:.3f}), labels "
          f"equal to Keras on {lite['agreement']:.2%}")  # fmt: skip
    names = ("data", "run", "model", "report_single", "report_sliding", "overlays", "curves")
    for name in (*names, "confusion", "saved_model", "litert"):
        print(f"{name:>12}: {summary['paths'][name]}")
    print(f"{'summary':>12}: {summary['paths']['summary']}")
