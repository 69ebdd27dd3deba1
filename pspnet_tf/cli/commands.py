"""What each ``pspnet-tf`` subcommand does: one function per subcommand, taking the parsed
arguments and returning the exit code. Imports happen inside each, so that building the
parser and ``--help`` stay cheap.
"""

from __future__ import annotations

import os
import sys

from pspnet_tf.errors import one_line

DEBUG_VARIABLE = "PSPNET_TF_DEBUG"


class UsageError(ValueError):
    """A bad command-line value (exit code 2); the message names the flag."""


def _summary(args):
    import time

    from pspnet_tf.model.build import build_pspnet

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
    from pspnet_tf.data.checks import check_dataset
    from pspnet_tf.data.layouts import list_pairs

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


def _load_model(path, litert=False, threads=2):
    """Loads the ``--model`` of evaluate, predict and export.

    With ``litert`` (evaluate, predict), a TFLite file (by content) becomes a
    :class:`pspnet_tf.infer.litert.LiteRTPredictor`, and an ONNX file an
    :class:`pspnet_tf.infer.onnx_model.OnnxPredictor`, running ``threads`` threads.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, or a ``.keras`` file that is not a readable zip (truncated,
            a text file) or that Keras cannot load; the message names the file.
    """
    import zipfile

    import keras

    import pspnet_tf.model.layers  # noqa: F401  (registers the custom layers)

    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"model {path!r}: a folder, not a .keras file")
    if litert:
        from pspnet_tf.infer.litert import LiteRTPredictor, is_litert_file

        if is_litert_file(path):  # by content, whatever the name
            return LiteRTPredictor(path, threads=threads)
        from pspnet_tf.infer.onnx_model import OnnxPredictor, is_onnx_file

        if is_onnx_file(path):
            return OnnxPredictor(path, threads=threads)
    unreadable = f"model {path!r}: not a readable .keras file (truncated or not a Keras model)"
    # Keras answers "File not found" for a file that is there but not a zip.
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(unreadable)
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{unreadable}: {one_line(error)}") from error


def _evaluate(args):
    """Scans the split first: bad pairs are skipped and listed (exit 1); --strict refuses."""
    from pspnet_tf.data.checks import short_reason
    from pspnet_tf.data.classes import resolve_classes
    from pspnet_tf.data.pipeline import load_dataset
    from pspnet_tf.files import PNG, check_output
    from pspnet_tf.infer.evaluation import (
        BASE_SIZES,
        JSON_REPORT,
        evaluate,
        format_report,
        plot_confusion_matrix,
        write_json_report,
    )
    from pspnet_tf.infer.predictor import as_predictor

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
    predictor = as_predictor(_load_model(args.model, True, args.threads), precision=args.precision)
    if args.num_classes and args.num_classes != predictor.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} does not match the model, which "
                         f"gives {predictor.num_classes} classes")  # fmt: skip
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
    from pspnet_tf.data.checks import find_bad_pairs

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
    from pspnet_tf.infer.predict import (
        image_paths,
        is_video,
        planned_outputs,
        predict_files,
        predict_video,
    )
    from pspnet_tf.infer.predictor import as_predictor

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
    predictor = as_predictor(_load_model(args.model, True, args.threads), precision=args.precision)
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
    from pspnet_tf.files import check_output
    from pspnet_tf.infer import export

    # Flags first: a bad one fails before the model is loaded.
    litert = args.format in ("litert", "tflite")
    if args.precision and args.format != "saved_model":
        raise UsageError("--precision applies to --format saved_model only")
    if litert and not args.input_size:
        raise UsageError(f"--format {args.format} needs --input-size H [W]")
    if not litert and (args.quantization != "none" or args.calibration):
        raise UsageError("--quantization and --calibration apply to --format litert only")
    if args.quantization == "int8" and not args.calibration:
        raise UsageError("--quantization int8 needs --calibration DIR (a folder of images)")
    if args.check and not (litert and args.layout):
        raise UsageError("--check DATA applies to --format litert and needs --layout")
    _check_positive(args, "input_size", "calibration_images")
    input_size = _height_width(args.input_size, "--input-size")
    check_output(args.output, export.OUTPUT_KINDS[args.format])  # before the model is read
    model = _load_model(args.model)
    if args.format == "saved_model":
        path = export.export_saved_model(model, args.output, precision=args.precision)
    elif litert:
        from pspnet_tf.infer.litert import export_litert

        path = export_litert(
            model, args.output, input_size, args.quantization,
            calibration=_calibration(args), calibration_images=args.calibration_images,
        )  # fmt: skip
    else:
        path = export.export_onnx(model, args.output)
    print(f"wrote {path}")
    if args.check:
        print(_accuracy_cost(args, model, path))
    return 0


def _calibration(args):
    """--calibration: a folder of images, else (with --layout) a dataset's split."""
    from pspnet_tf.data.images import read_rgb
    from pspnet_tf.data.layouts import list_pairs
    from pspnet_tf.infer.predict import list_images

    folder = args.calibration
    if not folder or not args.layout or not os.path.isdir(folder) or list_images(folder):
        return folder

    pairs = list_pairs(args.calibration, args.layout, args.calibration_split)
    count = args.calibration_images or 100
    return [read_rgb(image) for image, _ in pairs[:count]]


def _accuracy_cost(args, model, path):
    """The table of :func:`pspnet_tf.infer.evaluation.compare`: the Keras model and the file."""
    from pspnet_tf.data.pipeline import load_dataset
    from pspnet_tf.infer.evaluation import compare, format_comparison
    from pspnet_tf.infer.litert import LiteRTPredictor

    lite = LiteRTPredictor(path)
    name = f"LiteRT {args.quantization}"
    data = load_dataset(args.check, args.layout, args.split, lite.num_classes, batch_size=1)
    rows = compare({"Keras float32": model, name: lite}, data, max_images=args.max_images)
    sizes = {"Keras float32": os.path.getsize(args.model), name: os.path.getsize(path)}
    return f"on {rows[0]['num_images']} images of {args.check} ({args.split}):\n" + (
        format_comparison(rows, sizes)
    )


def _train(args):
    from pspnet_tf.training.recipe import DEFAULTS, ConfigError, train

    # Only the flags given on the command line override the config file.
    overrides = {key: value for key, value in vars(args).items() if key in DEFAULTS}
    try:
        train(args.config, **overrides)
    except ConfigError as error:
        raise UsageError(_train_flag_message(error, overrides, args.config)) from None
    except KeyboardInterrupt:  # Ctrl-C: the backup of the last finished epoch stands
        from pspnet_tf.training.config import resolve_config
        from pspnet_tf.training.run_folder import finished_epochs

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
    from pspnet_tf.model.network import get_metadata
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


def _demo(args):
    from pspnet_tf.demo import run_demo

    run_demo(args.output, quick=args.quick, verbose=0 if args.quiet else 1)
    return 0
