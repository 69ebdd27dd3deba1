"""Parameter count, build time and batch-1 forward latency of each PSPNet backbone.

Usage: python benchmarks/core_model.py [--size 473] [--runs 10] [--backbones resnet50 ...]
Prints a table; latency is median (min-max) over --runs calls of a tf.function after
two warm-up calls, float32, output stride 8, 21 classes, no aux head.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pspnet_tf import build_pspnet  # noqa: E402


def measure(backbone, size, runs):
    start = time.perf_counter()
    model = build_pspnet(21, backbone, (size, size, 3))
    build_s = time.perf_counter() - start
    forward = tf.function(lambda x: model(x, training=False))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)), tf.float32)
    for _ in range(2):
        forward(x).numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    return model.count_params(), build_s, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101", "mobilenetv2"])
    args = parser.parse_args()
    print(f"TF {tf.__version__}, {os.cpu_count()} CPUs, input {args.size}x{args.size}, batch 1")
    print(f"{'backbone':<12} {'params':>12} {'build s':>8} {'median ms':>10} {'min-max ms':>16}")
    for backbone in args.backbones:
        params, build_s, times = measure(backbone, args.size, args.runs)
        ms = [t * 1000 for t in times]
        print(
            f"{backbone:<12} {params:>12,} {build_s:>8.2f} {statistics.median(ms):>10.0f} "
            f"{min(ms):>7.0f}-{max(ms):<8.0f}"
        )


if __name__ == "__main__":
    main()
