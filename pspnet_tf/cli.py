"""The ``pspnet-tf`` command line (also ``python -m pspnet_tf``).

Each subcommand is a small function taking the parsed arguments; its imports happen
inside it, so ``--help`` and ``--version`` never load TensorFlow. :func:`console` (the
installed command) silences TensorFlow's start-up log lines for its own process;
:func:`main` changes nothing, so tests and scripts can call it in-process.

Environment: ``TF_ENABLE_ONEDNN_OPTS`` (0 or 1) turns TensorFlow's oneDNN kernels off or
on (the README's performance section says when each helps); ``PSPNET_TF_DEBUG=1`` shows
tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

DEBUG_VARIABLE = "PSPNET_TF_DEBUG"


class UsageError(ValueError):
    """A bad command-line value (exit code 2); the message names the flag."""


def _summary(args):
    import time

    from pspnet_tf.model import build_pspnet

    size = args.input_size
    start = time.perf_counter()
    model = build_pspnet(
        args.num_classes,
        backbone=args.backbone,
        input_shape=(size, size, 3) if size else (None, None, 3),
        output_stride=args.output_stride,
        aux_head=args.aux_head,
        alpha=args.alpha,
    )
    elapsed = time.perf_counter() - start
    model.summary(line_length=110, expand_nested=False)
    print(f"built {model.name} in {elapsed:.1f} s: {model.count_params():,} parameters")
    return 0


def _check_data(args):
    from pspnet_tf.data import check_dataset, list_pairs

    problems, checked = [], 0
    for split in args.split:
        try:
            checked += len(list_pairs(args.data, args.layout, split, list_file=args.list_file))
        except (OSError, ValueError):
            pass  # check_dataset reports it
        problems += check_dataset(
            args.data, args.layout, split, args.num_classes, list_file=args.list_file
        )
    for problem in problems:
        print(problem)
    splits = ", ".join(args.split)
    print(f"checked {checked} image/label pairs ({splits}): {len(problems)} problems")
    return 1 if problems else 0


def _benchmark(args):
    from pspnet_tf import benchmark

    return benchmark.run(args)


def _load_model(path):
    """Loads the ``--model`` of evaluate, predict and export.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, or a ``.keras`` file that is not a readable zip (truncated,
            a text file) or that Keras cannot load; the message names the file.
    """
    import zipfile

    import keras

    import pspnet_tf.layers  # noqa: F401  (registers the custom layers)

    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"model {path!r}: a folder, not a .keras file")
    unreadable = f"model {path!r}: not a readable .keras file (truncated or not a Keras model)"
    # Keras answers "File not found" for a file that is there but not a zip.
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(unreadable)
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{unreadable}: {_message(error)}") from error


def _precision_argument(parser, default_text="the model's own"):
    from pspnet_tf.precision import PRECISIONS

    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help=f"compute dtype (weights and outputs stay float32); default: {default_text}. "
        "bfloat16 is ~2x faster on CPUs with bf16 instructions; mixed: bf16 on CPU, fp16 on GPU",
    )  # fmt: skip


def _evaluate(args):
    """Scans the split first: bad pairs are skipped and listed (exit 1); --strict refuses."""
    from pspnet_tf.classes import resolve_classes
    from pspnet_tf.data import load_dataset, short_reason
    from pspnet_tf.evaluation import (
        BASE_SIZES,
        JSON_REPORT,
        evaluate,
        format_report,
        plot_confusion_matrix,
        write_json_report,
    )
    from pspnet_tf.files import PNG, check_output
    from pspnet_tf.inference import as_predictor

    _check_positive(args, "num_classes", "crop_size", "stride", "base_size", "max_images", "scales")
    crop_size = _height_width(args.crop_size, "--crop-size")
    stride = _height_width(args.stride, "--stride")
    base_size = args.base_size or BASE_SIZES.get(args.layout)
    if args.mode == "multiscale" and not base_size:
        raise UsageError("--mode multiscale with --layout list needs --base-size")
    if args.json:
        check_output(args.json, JSON_REPORT)  # before the model is read
    if args.confusion_png:
        check_output(args.confusion_png, PNG)
    predictor = as_predictor(_load_model(args.model), precision=args.precision)
    num_classes = args.num_classes or predictor.num_classes
    bad = _bad_pairs(args, num_classes)
    dataset = load_dataset(
        args.data, args.layout, args.split, num_classes, batch_size=1,
        list_file=args.list_file, skip=bad,
    )  # fmt: skip
    names, _, _ = resolve_classes(
        num_classes,
        args.class_names,
        model=(predictor.class_names, predictor.palette),
        dataset=args.layout,
    )
    report = evaluate(
        predictor, dataset, num_classes, mode=args.mode, crop_size=crop_size, stride=stride,
        base_size=base_size, scales=args.scales, flip=not args.no_flip, class_names=names,
        max_images=args.max_images,
    )  # fmt: skip
    report["skipped"] = [image for image, _ in bad]
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json_report(report, args.json)}")
    if args.confusion_png:
        print(f"wrote {plot_confusion_matrix(report, args.confusion_png)}")
    if bad:
        reasons = [f"{image} ({short_reason(problems)})" for (image, _), problems in bad.items()]
        print(f"evaluated {report['num_images']} of {report['num_images'] + len(bad)} "
              f"images; skipped: {', '.join(reasons)}")  # fmt: skip
    return 1 if bad else 0


def _bad_pairs(args, num_classes):
    """The split's bad pairs, each warned about; with --strict the first one raises."""
    from pspnet_tf.data import find_bad_pairs

    bad = find_bad_pairs(args.data, args.layout, args.split, num_classes, list_file=args.list_file)
    if bad and args.strict:
        raise ValueError(next(iter(bad.values()))[0])
    for problems in bad.values():
        _warn("skipped: " + "; ".join(problems))
    return bad


def _warn(message):
    import logging

    logging.getLogger("pspnet_tf").warning("%s", message)


def _check_positive(args, *names):
    """UsageError naming the flag if one of ``names`` (int, float or list) is <= 0."""
    for name in names:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        if value is not None and any(v <= 0 for v in values):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be positive, got {' '.join(map(str, values))}")


def _height_width(values, flag="size"):
    """``[n]`` -> n, ``[h, w]`` -> (h, w), None -> None (for ``nargs="+"`` size options)."""
    if not values:
        return None
    if len(values) > 2:
        raise UsageError(f"{flag}: expected a size H or H W, got {' '.join(map(str, values))}")
    return values[0] if len(values) == 1 else tuple(values)


def _predict(args):
    """Unreadable images are skipped and listed (exit 1); --strict stops at the first."""
    from pspnet_tf.inference import as_predictor
    from pspnet_tf.predict import (
        image_paths,
        is_video,
        planned_outputs,
        predict_files,
        predict_video,
    )

    _check_positive(args, "crop_size", "base_size")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    video = len(args.input) == 1 and is_video(args.input[0]) and os.path.isfile(args.input[0])
    paths = None if video else image_paths(args.input)  # a bad --input fails before loading
    if paths:
        planned_outputs(paths, args.output, args.outputs)  # so does a bad --output
    options = dict(
        outputs=args.outputs, legend=args.legend, alpha=args.alpha,
        class_names=args.class_names or args.dataset, palette=args.dataset, mode=args.mode,
        crop_size=_height_width(args.crop_size, "--crop-size"), base_size=args.base_size,
    )  # fmt: skip
    predictor = as_predictor(_load_model(args.model), precision=args.precision)
    if video:
        written = predict_video(predictor, args.input[0], args.output, **options)
        print(f"wrote {len(written)} files to {args.output}")
        return 0
    skipped = None if args.strict else []
    written = predict_files(predictor, paths, args.output, skipped=skipped, **options)
    skipped = skipped or []
    summary = f"wrote {len(written)} files to {args.output}: "
    summary += f"{len(paths) - len(skipped)} of {len(paths)} images"
    if skipped:
        summary += "; skipped: " + ", ".join(f"{path} ({reason})" for path, reason in skipped)
    print(summary)
    return 1 if skipped else 0


def _export(args):
    from pspnet_tf import export
    from pspnet_tf.files import check_output

    # Flags first: a bad one fails before the model is loaded.
    if args.precision and args.format != "saved_model":
        raise UsageError("--precision applies to --format saved_model only")
    if args.format == "tflite" and not args.input_size:
        raise UsageError("--format tflite needs --input-size H [W]")
    _check_positive(args, "input_size")
    input_size = _height_width(args.input_size, "--input-size")
    check_output(args.output, export.OUTPUT_KINDS[args.format])  # before the model is read
    model = _load_model(args.model)
    if args.format == "saved_model":
        path = export.export_saved_model(model, args.output, precision=args.precision)
    elif args.format == "tflite":
        path = export.export_tflite(model, args.output, input_size, args.quantize)
    else:
        path = export.export_onnx(model, args.output)
    print(f"wrote {path}")
    return 0


def _train(args):
    from pspnet_tf.training import DEFAULTS, ConfigError, train

    # Only the flags given on the command line override the config file.
    overrides = {key: value for key, value in vars(args).items() if key in DEFAULTS}
    try:
        train(args.config, **overrides)
    except ConfigError as error:
        raise UsageError(_train_flag_message(error, overrides, args.config)) from None
    except KeyboardInterrupt:  # Ctrl-C: the backup of the last finished epoch stands
        from pspnet_tf.run_folder import finished_epochs
        from pspnet_tf.train_config import resolve_config

        output = resolve_config(args.config, **overrides)["output"]
        print(f"pspnet-tf train: interrupted after epoch {finished_epochs(output)}; run the "
              "same command to resume", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _train_flag_message(error, overrides, config_file):
    """A config error in the words of the command line: the flag, or the config file."""
    message, key = str(error), error.key
    if key in overrides and message.startswith(f"{key} "):
        return f"--{key.replace('_', '-')}{message[len(key) :]}"
    if config_file and key not in overrides and key != "config":
        return f"{message} (in {config_file})"
    return message


def _convert(args):
    import os
    import warnings

    from pspnet_tf.files import KERAS_MODEL, atomic_path, check_output
    from pspnet_tf.network import get_metadata
    from pspnet_tf.weights import convert_checkpoint

    check_output(args.output, KERAS_MODEL)  # before the conversion
    size = args.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped tensors are printed below
        model = convert_checkpoint(
            args.source,
            args.checkpoint,
            input_shape=(size, size, 3) if size else (None, None, 3),
            output_stride=args.output_stride,
            aux_head=False if args.no_aux else None,
            dataset=args.dataset,
        )
    output = os.path.abspath(args.output)
    with atomic_path(output, KERAS_MODEL) as temporary:
        model.save(temporary)
    meta = get_metadata(model)
    arch, pre = meta["architecture"], meta["architecture"]["preprocessing"]
    print(f"wrote {output}: {arch['backbone']}, {arch['num_classes']} classes, "
          f"output stride {arch['output_stride']}, aux head {arch['aux_head']}")  # fmt: skip
    print(f"input preprocessing (applied by the model): channel_order {pre['channel_order']}, "
          f"mean {pre['mean']}, std {pre['std']} (0-255 units)")  # fmt: skip
    dropped = meta["weights_source"]["dropped"]
    if dropped:
        print(f"dropped {len(dropped)} auxiliary-head tensors: {', '.join(dropped)}")
    return 0


def _none_or(kind):
    """argparse type: ``none``/``null`` -> None, else ``kind(value)``."""
    return lambda value: None if value.lower() in ("none", "null") else kind(value)


def _demo(args):
    from pspnet_tf.demo import run_demo

    run_demo(args.output, quick=args.quick, verbose=0 if args.quiet else 1)
    return 0


def build_parser():
    # The choices are the modules' own lists, so a new backbone or layout shows up here.
    from pspnet_tf.backbones import BACKBONES, OUTPUT_STRIDES
    from pspnet_tf.classes import DATASETS
    from pspnet_tf.distributed import STRATEGIES
    from pspnet_tf.export import FORMATS, QUANTIZATIONS
    from pspnet_tf.inference import MODES
    from pspnet_tf.layouts import LAYOUTS
    from pspnet_tf.predict import OUTPUTS
    from pspnet_tf.training import OPTIMIZERS
    from pspnet_tf.weights.convert import SOURCES

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
    p.set_defaults(func=_demo)

    p = sub.add_parser("summary", help="build a PSPNet and print its layers and parameter count")
    p.add_argument("--backbone", default="mobilenetv2", choices=BACKBONES)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--input-size", type=int, default=473, help="square input size; 0 for any size")
    p.add_argument("--output-stride", type=int, default=8, choices=OUTPUT_STRIDES)
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    p.add_argument("--aux-head", action="store_true", help="add the auxiliary head")
    p.set_defaults(func=_summary)

    p = sub.add_parser("check-data", help="scan a dataset and report every bad file")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--split", nargs="+", default=["train", "val"], help="splits to check")
    p.add_argument("--list-file", help="split file (VOC ids or 'image label' pairs)")
    p.set_defaults(func=_check_data)

    from pspnet_tf import benchmark

    p = sub.add_parser("benchmark", help="speed and memory table of the models on this machine")
    benchmark.add_arguments(p)
    p.set_defaults(func=_benchmark)
    p = sub.add_parser("evaluate", help="mIoU, pixel accuracy and per-class IoU on a dataset")
    p.add_argument("--model", required=True, help=".keras model file")
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
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="label PNGs, coloured masks and overlays of images/video")
    p.add_argument("--model", required=True, help=".keras model file")
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
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="SavedModel (any size), TFLite (fixed size) or ONNX")
    p.add_argument("--model", required=True, help=".keras model file")
    p.add_argument("--output", required=True, help="SavedModel folder or .tflite/.onnx file")
    p.add_argument("--format", default="saved_model", choices=FORMATS)
    p.add_argument("--input-size", type=int, nargs="+", help="TFLite input H [W]")
    p.add_argument("--quantize", choices=[q for q in QUANTIZATIONS if q],
                   help="TFLite dynamic-range quantisation")  # fmt: skip
    _precision_argument(p)
    p.set_defaults(func=_export)

    # Defaults live in pspnet_tf.training.DEFAULTS; unset flags leave the config file's value.
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
    p.set_defaults(func=_train)

    p = sub.add_parser("convert", help="convert a published PSPNet checkpoint to a .keras model")
    p.add_argument(
        "--from", dest="source", required=True, choices=sorted(SOURCES),
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
    p.set_defaults(func=_convert)
    return parser


def _log_to_stderr():
    """The library's messages (the ``pspnet_tf`` logger) as ``pspnet-tf: ...`` lines."""
    import logging

    log = logging.getLogger("pspnet_tf")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pspnet-tf: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _quiet_tensorflow():
    """Imports TensorFlow with its start-up lines silenced (this process only).

    ``TF_CPP_MIN_LOG_LEVEL`` (unless the user set it) quiets the later ones; the first
    lines come from C++ before logging is set up, so file descriptor 2 goes to a
    temporary file while TensorFlow loads (replayed if the import fails).
    """
    import tempfile

    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def console():
    """The installed ``pspnet-tf`` command: :func:`main` with TensorFlow's start-up quiet."""
    _quiet_tensorflow()
    sys.exit(main(sys.argv[1:]))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr()
    if args.version:
        from pspnet_tf import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as error:
        # User errors (bad value, bad file, bad data) end in one line naming the flag or
        # file; --debug keeps the traceback for a bug report.
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        code = 2 if isinstance(error, UsageError) else 1
        print(f"pspnet-tf {args.command}: error: {_message(error)}", file=sys.stderr)
        return code


def _message(error):
    """One line: the exception's own words (a FileNotFoundError's file name included)."""
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(error):
        text = f"{error.strerror or error}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
