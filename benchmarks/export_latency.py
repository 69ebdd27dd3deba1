"""Size on disk and batch-1 latency of the exported models next to the Keras model.

Usage: python benchmarks/export_latency.py [--size 473] [--runs 10] [--backbone mobilenetv2]
    [--alpha 1.0] [--threads 2] [--onnx]

Builds PSPNet (21 classes, output stride 8, freshly initialised weights, or --model) at
--size and exports it as a SavedModel (any size), LiteRT float32, float16, dynamic-range
and full-integer int8 (fixed size; int8 calibrated on --calibration images, or on 16 random
ones: the calibration changes the labels, not the speed), and optionally ONNX. The first
line names the machine (CPU, ISA features, oneDNN on or off). Every row computes the
same thing, labels and probabilities of one uint8 --size image: the Keras row runs the
serving function on the Keras model in a tf.function. Latency is the median (min-max)
of --runs calls after two warm-up calls; "agree" is the fraction of pixels whose label
equals the Keras label. Sizes: the .keras file, the SavedModel folder, the .tflite/.onnx
files.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pspnet_tf import build_pspnet, rebuild  # noqa: E402
from pspnet_tf.infer.export import (  # noqa: E402
    export_onnx,
    export_saved_model,
    serving_function,
)
from pspnet_tf.infer.litert import export_litert, run_tflite  # noqa: E402
from pspnet_tf.machine import describe  # noqa: E402
from pspnet_tf.options import LITERT_QUANTIZATIONS  # noqa: E402


def disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(fn, runs):
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def runners(model, image, directory, threads, onnx, calibration):
    """Yields ``(name, path, call)``: ``call()`` returns the labels of ``image``."""
    size = image.shape[:2]
    path = os.path.join(directory, "model.keras")
    model.save(path)
    keras_fn = tf.function(serving_function(model, check_input=False))
    batch = tf.constant(image[None])
    yield "Keras", path, lambda: keras_fn(batch)["labels"].numpy()

    path = export_saved_model(model, os.path.join(directory, "saved_model"))
    loaded = tf.saved_model.load(path)
    yield "SavedModel", path, lambda: loaded.serving_default(batch)["labels"].numpy()

    for quantization in LITERT_QUANTIZATIONS:
        path = os.path.join(directory, f"{quantization}.tflite")
        export_litert(model, path, size, quantization, calibration=calibration)
        name = f"LiteRT {quantization if quantization != 'none' else 'fp32'}"
        yield name, path, lambda p=path: run_tflite(p, image, num_threads=threads)["labels"]

    if onnx:
        import onnxruntime

        path = export_onnx(model, os.path.join(directory, "model.onnx"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        yield "ONNX Runtime", path, lambda: session.run(["labels"], {"images": image[None]})[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--onnx", action="store_true", help="add an ONNX Runtime row (tf2onnx)")
    parser.add_argument("--model", help="a trained .keras model instead of a fresh one")
    parser.add_argument("--calibration", help="int8: a folder of images (default: random)")
    args = parser.parse_args()
    size = args.size
    if args.model:
        model = keras.models.load_model(args.model, compile=False)
        model = rebuild(model, input_shape=(size, size, 3), aux_head=False)
    else:
        model = build_pspnet(21, args.backbone, (size, size, 3), alpha=args.alpha)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3)).astype("uint8")
    calibration = args.calibration or list(rng.integers(0, 256, (16, size, size, 3), np.uint8))
    print(f"machine: {describe()}")
    print(
        f"TF {tf.__version__}, PSPNet {model.name} {size}x{size}, batch 1, {args.runs} runs, "
        f"LiteRT/ONNX threads {args.threads}"
    )
    print(
        f"{'format':<15} {'size MB':>8} {'export s':>9} {'median ms':>10} {'min-max ms':>12} agree"
    )
    reference = None
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        rows = runners(model, image, directory, args.threads, args.onnx, calibration)
        for name, path, call in rows:
            export_s = time.perf_counter() - start
            labels = np.asarray(call()).reshape(size, size)
            reference = labels if reference is None else reference
            times = timed(call, args.runs)
            print(
                f"{name:<15} {disk_size(path) / 1e6:>8.1f} {export_s:>9.1f} "
                f"{statistics.median(times):>10.0f} {min(times):>5.0f}-{max(times):<6.0f} "
                f"{(labels == reference).mean():.4f}",
                flush=True,
            )
            start = time.perf_counter()
    return 0


if __name__ == "__main__":
    sys.exit(main())
