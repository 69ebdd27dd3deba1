"""Memory of a long predict run: resident size after the first images and at the end.

Usage: python benchmarks/predict_memory.py [--images 200] [--same-size] [--folder DIR]

Writes ``--images`` random JPEGs of 20-90 px a side (or all 64x64 with ``--same-size``),
predicts them with a tiny PSPNet (MobileNetV2 alpha 0.35, 3 classes, any input size)
through :func:`pspnet_tf.infer.predict.predict_files` with every output, and prints VmRSS after
the first 20 images and every 45 after, the number of traces of the prediction function,
and any tf.function retracing warning. Set ``TF_ENABLE_ONEDNN_OPTS=0|1`` to compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile


def resident_mib():
    """VmRSS of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_images(folder, count, same_size, seed=0):
    """``count`` random JPEGs in ``folder``; returns their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = (64, 64) if same_size else rng.integers(20, 91, 2)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(rng.integers(0, 256, (height, width, 3)).astype("uint8")).save(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--same-size", action="store_true", help="all images 64x64")
    parser.add_argument("--folder", help="where the images and outputs go (default: a temp dir)")
    args = parser.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="predict_memory_")
    retracing = []
    handler = logging.Handler()
    handler.emit = lambda record: retracing.append(record.getMessage())
    logging.getLogger("tensorflow").addHandler(handler)

    from pspnet_tf import build_pspnet
    from pspnet_tf.infer.predict import predict_files
    from pspnet_tf.infer.predictor import as_predictor

    paths = write_images(os.path.join(folder, "in"), args.images, args.same_size)
    model = build_pspnet(3, backbone="mobilenetv2", alpha=0.35, input_shape=(None, None, 3))
    predictor = as_predictor(model)
    output = os.path.join(folder, "out")
    predict_files(predictor, paths[:20], output, verbose=0)
    first = resident_mib()
    marks = []
    for start in range(20, len(paths), 45):
        predict_files(predictor, paths[start : start + 45], output, verbose=0)
        marks.append(round(resident_mib()))
    traces = predictor._fn.experimental_get_tracing_count()
    print(f"RSS after 20 images: {first:.0f} MiB; after {len(paths)}: {resident_mib():.0f} MiB")
    print(f"every 45 images: {marks}")
    print(f"traces of the prediction function: {traces}")
    print(f"retracing warnings: {[m for m in retracing if 'retracing' in m]}")


if __name__ == "__main__":
    main()
