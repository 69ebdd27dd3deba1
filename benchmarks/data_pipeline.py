"""Images per second of the data pipelines against a PSPNet-MobileNetV2 training step.

Usage: python benchmarks/data_pipeline.py [--images 64] [--crop 473] [--batch 8] [--skip-model]

Writes a generated VOC-layout dataset of 500x375 JPEGs with palette PNG labels (VOC's usual
size) to a temporary folder, then measures:
- the training pipeline (read, decode, augment, crop to --crop, batch) and the validation
  pipeline (read, decode, full images, batch 1), each after a warm-up, repeated over the
  files (no cache);
- a PSPNet-MobileNetV2 training step (aux head, SGD, cross-entropy with ignore 255 on both
  outputs, `train_on_batch`) at the same crop and batch, after warm-up.
The target is a ratio of at least 3: the input pipeline is then never the bottleneck.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pspnet_tf import build_pspnet  # noqa: E402
from pspnet_tf.data.demo import make_demo_dataset
from pspnet_tf.data.pipeline import load_dataset

NUM_CLASSES = 21


def pipeline_rate(dataset, batches, warmup=3):
    """Images per second over ``batches`` batches after ``warmup`` batches."""
    iterator = iter(dataset.repeat())
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        count += int(images.shape[0])
    return count / (time.perf_counter() - start)


def training_step_rate(images, labels, crop, steps, warmup=2):
    """Images per second of PSPNet-MobileNetV2 ``train_on_batch`` at ``crop``."""
    model = build_pspnet(NUM_CLASSES, "mobilenetv2", (crop, crop, 3), aux_head=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        loss={"main": loss, "aux": loss},
        loss_weights={"main": 1.0, "aux": 0.4},
    )
    targets = {"main": labels, "aux": labels}
    for _ in range(warmup):
        model.train_on_batch(images, targets)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, targets)
    return steps * int(images.shape[0]) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated images per split")
    parser.add_argument("--crop", type=int, default=473)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30, help="timed training batches")
    parser.add_argument("--steps", type=int, default=5, help="timed model training steps")
    parser.add_argument("--skip-model", action="store_true", help="time the pipelines only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = make_demo_dataset(
            os.path.join(folder, "voc"), args.images, args.images, size=(375, 500), seed=0
        )
        train = load_dataset(
            root, "voc", "train", NUM_CLASSES, args.crop, args.batch, training=True, seed=0
        )
        val = load_dataset(root, "voc", "val", NUM_CLASSES)
        train_rate = pipeline_rate(train, args.batches)
        val_rate = pipeline_rate(val, args.batches * args.batch)
        images, labels = next(iter(train))
    print(f"TF {tf.__version__}, {os.cpu_count()} CPUs; 500x375 JPEG + palette PNG inputs")
    rows = [
        (f"training pipeline (augment, crop {args.crop}, batch {args.batch})", train_rate),
        ("validation pipeline (full images, batch 1)", val_rate),
    ]
    if not args.skip_model:
        step_rate = training_step_rate(images, labels, args.crop, args.steps)
        rows.append((f"PSPNet-MobileNetV2 train step ({args.crop}, batch {args.batch})", step_rate))
    print(f"{'what':<52} {'images/s':>9}")
    for name, rate in rows:
        print(f"{name:<52} {rate:>9.1f}")
    if not args.skip_model:
        print(
            f"ratio training pipeline / training step: {train_rate / step_rate:.1f}x (target >= 3)"
        )


if __name__ == "__main__":
    main()
