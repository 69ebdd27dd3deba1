"""The ``pspnet-tf`` argument parser: every subcommand, its flags and their help."""

from __future__ import annotations

import argparse

from pspnet_tf.cli import commands
from pspnet_tf.cli.commands import DEBUG_VARIABLE


def _precision_argument(parser, default_text="the model's own"):
    from pspnet_tf.precision import PRECISIONS

    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help=f"compute dtype (weights and outputs stay float32); default: {default_text}. "
        "bfloat16 is ~2x faster on CPUs with bf16 instructions; mixed: bf16 on CPU, fp16 on GPU",
    )  # fmt: skip


def _threads_argument(parser):
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of a .tflite or .onnx --model"
    )


def _none_or(kind):
    """argparse type: ``none``/``null`` -> None, else ``kind(value)``."""
    return lambda value: None if value.lower() in ("none", "null") else kind(value)


def build_parser():
    # The choices the modules take (pspnet_tf.options): --help loads no TensorFlow.
    from pspnet_tf.data.classes import DATASETS
    from pspnet_tf.options import (
        BACKBONES,
        FORMATS,
        LAYOUTS,
        LITERT_QUANTIZATIONS,
        MODES,
        OPTIMIZERS,
        OUTPUT_STRIDES,
        OUTPUTS,
        STRATEGIES,
        WEIGHT_SOURCES,
    )

    parser = argparse.ArgumentParser(
        prog="pspnet-tf",
        description="PSPNet for Keras 3 / TensorFlow.",
        epilog="Environment: TF_ENABLE_ONEDNN_OPTS=0|1 turns TensorFlow's oneDNN CPU "
        "kernels off or on (TensorFlow's default depends on the CPU; see the README's "
        "performance section); PSPNET_TF_DEBUG=1 shows tracebacks.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the Python traceback of an error (or set {DEBUG_VARIABLE}=1)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="the main job: train, evaluate and export on generated data")
    p.add_argument("--output", default="pspnet_demo", help="folder for everything it writes")
    p.add_argument("--quick", action="store_true", help="a ~3 minute version for smoke tests")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=commands._demo)

    p = sub.add_parser("summary", help="build a PSPNet and print its layers and parameter count")
    p.add_argument("--backbone", default="mobilenetv2", choices=BACKBONES)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--input-size", type=int, default=473, help="square input size; 0 for any size")
    p.add_argument("--output-stride", type=int, default=8, choices=OUTPUT_STRIDES)
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    p.add_argument("--aux-head", action="store_true", help="add the auxiliary head")
    p.set_defaults(func=commands._summary)

    p = sub.add_parser("check-data", help="scan a dataset and report every bad file")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--split", nargs="+", default=["train", "val"], help="splits to check")
    p.add_argument("--list-file", help="split file (VOC ids or 'image label' pairs)")
    p.set_defaults(func=commands._check_data)

    from pspnet_tf import benchmark

    p = sub.add_parser("benchmark", help="speed and memory table of the models on this machine")
    benchmark.add_arguments(p)
    p.set_defaults(func=commands._benchmark)
    p = sub.add_parser("evaluate", help="mIoU, pixel accuracy and per-class IoU on a dataset")
    p.add_argument("--model", required=True, help=".keras, .tflite or .onnx model file")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--split", default="val")
    p.add_argument("--list-file", help="split file (VOC ids or 'image label' pairs)")
    p.add_argument("--num-classes", type=int, help="default: the model's output channels")
    p.add_argument("--mode", default="single", choices=MODES)
    p.add_argument("--crop-size", type=int, nargs="+", help="window H [W]; default: model size")
    p.add_argument("--stride", type=int, nargs="+", help="window stride; default 2/3 of crop")
    p.add_argument("--base-size", type=int, help="multiscale long side at scale 1 (VOC/ADE 512)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    p.add_argument("--no-flip", action="store_true", help="multiscale without flipped images")
    p.add_argument("--class-names", help="file with one class name per line")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--confusion-png", help="draw the confusion matrix into this PNG")
    p.add_argument(
        "--strict", action="store_true",
        help="refuse a split with a bad pair; by default the split is scanned first (as "
        "check-data does), bad pairs are skipped and listed, and the exit code is 1",
    )  # fmt: skip
    _precision_argument(p)
    _threads_argument(p)
    p.set_defaults(func=commands._evaluate)

    p = sub.add_parser("predict", help="label PNGs, coloured masks and overlays of images/video")
    p.add_argument("--model", required=True, help=".keras, .tflite or .onnx model file")
    p.add_argument(
        "--input", required=True, nargs="+",
        help="images and folders of images, or one video",
    )  # fmt: skip
    p.add_argument(
        "--strict", action="store_true",
        help="stop at the first unreadable image; by default it is skipped with a warning, "
        "the rest are written, and the exit code is 1",
    )  # fmt: skip
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--outputs", nargs="+", default=["labels", "masks", "overlays"],
        choices=OUTPUTS,
    )  # fmt: skip
    p.add_argument("--legend", action="store_true", help="add a legend of the classes shown")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="names/palette")
    p.add_argument("--class-names", help="file with one class name per line")
    p.add_argument("--mode", default="single", choices=MODES)
    p.add_argument("--crop-size", type=int, nargs="+", help="sliding window H [W]")
    p.add_argument("--base-size", type=int, help="multiscale long side at scale 1")
    _precision_argument(p)
    _threads_argument(p)
    p.set_defaults(func=commands._predict)

    p = sub.add_parser("export", help="SavedModel (any size), LiteRT/TFLite (fixed size), ONNX")
    p.add_argument("--model", required=True, help=".keras model file")
    p.add_argument("--output", required=True, help="SavedModel folder or .tflite/.onnx file")
    p.add_argument(
        "--format", default="saved_model", choices=FORMATS,
        help="litert (or tflite): one input size, for CPUs and phones",
    )  # fmt: skip
    p.add_argument("--input-size", type=int, nargs="+", help="LiteRT input H [W]")
    p.add_argument(
        "--quantization", default="none", choices=LITERT_QUANTIZATIONS,
        help="LiteRT: float16 or int8 weights (dynamic), or full-integer int8 (needs "
        "--calibration)",
    )  # fmt: skip
    p.add_argument(
        "--calibration", metavar="DIR",
        help="int8: a folder of images like those it will see, or with --layout a dataset "
        "(its --calibration-split, default train)",
    )  # fmt: skip
    p.add_argument("--calibration-split", default="train", help="int8: the dataset's split")
    p.add_argument("--calibration-images", type=int, help="int8: how many (default 100)")
    p.add_argument(
        "--check", metavar="DATA",
        help="LiteRT: evaluate the Keras model and the file on this dataset's split and print "
        "mIoU, pixel accuracy, labels equal to Keras, latency and size",
    )  # fmt: skip
    p.add_argument("--layout", choices=LAYOUTS, help="--calibration/--check: the dataset layout")
    p.add_argument("--split", default="val", help="--check: the split (default val)")
    p.add_argument("--max-images", type=int, help="--check: only the first N images")
    _precision_argument(p)
    p.set_defaults(func=commands._export)

    # Defaults: pspnet_tf.training.config.DEFAULTS; unset flags leave the config file's value.
    p = sub.add_parser(
        "train",
        argument_default=argparse.SUPPRESS,
        help="train with the paper's recipe; rerunning the same command resumes",
    )
    p.add_argument("--config", default=None, help="YAML/JSON config file; flags override it")
    p.add_argument("--data", help="dataset folder")
    p.add_argument("--layout", choices=LAYOUTS)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--backbone", choices=BACKBONES)
    p.add_argument("--alpha", type=float, help="MobileNetV2 width multiplier")
    p.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES)
    p.add_argument("--aux-head", action=argparse.BooleanOptionalAction)
    p.add_argument("--backbone-weights", type=_none_or(str), help="imagenet, a file or none")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=_none_or(int))
    p.add_argument("--validation-steps", type=_none_or(int))
    p.add_argument("--train-split")
    p.add_argument("--val-split", type=_none_or(str), help="none: no validation")
    p.add_argument("--loss", help="ce, dice, focal, ce+dice or focal+dice")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (the paper's) or adamw")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--head-lr-multiplier", type=float)
    p.add_argument("--freeze-backbone-epochs", type=int)
    _precision_argument(p, default_text="float32")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction)
    p.add_argument("--cache", action=argparse.BooleanOptionalAction)
    p.add_argument(
        "--bad-files", choices=["refuse", "skip"],
        help="bad image/label pairs found before training: refuse the run (default) or skip them",
    )  # fmt: skip
    p.add_argument("--seed", type=int)
    p.add_argument("--verbose", type=int, choices=[0, 1, 2])
    p.add_argument("--output", help="run folder: model.keras, checkpoints, logs, config")
    p.set_defaults(func=commands._train)

    p = sub.add_parser("convert", help="convert a published PSPNet checkpoint to a .keras model")
    p.add_argument(
        "--from", dest="source", required=True, choices=WEIGHT_SOURCES,
        help="semseg: hszhao/semseg .pth; bubbliiiing: bubbliiiing/pspnet-pytorch .pth; "
        "caffe: the Caffe model as .npy (see weights/README.md)",
    )  # fmt: skip
    p.add_argument("checkpoint", help="the checkpoint file")
    p.add_argument("--output", required=True, help="the .keras file to write")
    p.add_argument("--input-size", type=int, default=0, help="square input size; 0: any size")
    p.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES,
                   help="default: the source's")  # fmt: skip
    p.add_argument("--no-aux", action="store_true", help="drop the auxiliary head")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="names/palette")
    p.set_defaults(func=commands._convert)
    return parser
