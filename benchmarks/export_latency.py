"""Size on disk and batch-1 latency of the exported models next to the Keras model.

Usage: python benchmarks/export_latency.py [--size 473] [--runs 10] [--backbone mobilenetv2]
    [--alpha 1.0] [--threads 2] [--onnx]

Builds PSPNet (21 classes, output stride 8, freshly initialised weights) at --size and
exports it as a SavedModel (any size), TFLite float32 and TFLite dynamic-range (fixed
size), and optionally ONNX. Every row computes the same thing, labels and
probabilities of one uint8 --size image: the Keras row runs the serving function on the
Keras model in a tf.function. Latency is the median (min-max) of --runs calls after two
warm-up calls; "agree" is the fraction of pixels whose label equals the Keras label.
Sizes: the .keras file, the SavedModel folder, the .tflite/.onnx files.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pspnet_tf import build_pspnet  # noqa: E402
from pspnet_tf.infer.export import (  # noqa: E402
    export_onnx,
    export_saved_model,
    serving_function,
)
from pspnet_tf.infer.litert import export_tflite, run_tflite  # noqa: E402


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


def runners(model, image, directory, threads, onnx):
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

    for name, quantization in (("TFLite fp32", None), ("TFLite dynamic", "dynamic")):
        path = os.path.join(directory, f"{quantization or 'float32'}.tflite")
        export_tflite(model, path, size, quantization)
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
    args = parser.parse_args()
    size = args.size
    model = build_pspnet(21, args.backbone, (size, size, 3), alpha=args.alpha)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype("uint8")
    print(
        f"TF {tf.__version__}, {os.cpu_count()} CPUs, PSPNet-{args.backbone} (alpha {args.alpha}) "
        f"{size}x{size}, batch 1, {args.runs} runs, TFLite/ONNX threads {args.threads}"
    )
    print(
        f"{'format':<15} {'size MB':>8} {'export s':>9} {'median ms':>10} {'min-max ms':>12} agree"
    )
    reference = None
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        for name, path, call in runners(model, image, directory, args.threads, args.onnx):
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
