"""Speed and memory of PSPNet on this machine (``pspnet-tf benchmark``).

Every case runs in its own process, so peak resident memory is the case's own and
TensorFlow start-up settings (threads, oneDNN) apply cleanly. The table gives the
median/min/max latency over ``runs`` timed calls after warm-up, images per second,
convolution GFLOP per image (counted once, from the layer shapes), achieved
GFLOP/s and the fraction of the machine's measured matmul peak.

``benchmarks/speed.py`` in a source checkout adds a PyTorch implementation of the same
network, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from pspnet_tf.files import JSON_OBJECT, write_json
from pspnet_tf.options import BACKBONES

# (kind, batch, size): 473 batch-1 inference; training steps at 320 x 4 and 473 x 2.
FULL_CASES = [("infer", 1, 473), ("train", 4, 320), ("train", 2, 473)]
QUICK_CASES = [("infer", 1, 473), ("train", 4, 320)]
NUM_CLASSES = 21


def conv_flops(model):
    """Convolution FLOPs (2 x multiply-adds) per image of a static-size Keras model."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            total += 2 * kh * kw * out[1] * out[2] * out[3]
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            total += 2 * kh * kw * layer.input.shape[-1] * out[1] * out[2] * out[3]
    return total


def peak_gflops(dtype="float32", n=2048, runs=10):
    """Measured matmul GFLOP/s (best of ``runs``) for ``dtype`` with the current threads."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    best = min(timed(lambda: matmul(a).numpy()) for _ in range(runs))
    return 2 * n**3 / best / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# How a case's step runs. "default" is what the package runs on this machine: prediction
# and evaluation a frozen graph (pspnet_tf.infer.predictor.frozen_function), training Keras'
# jit_compile="auto" (XLA on GPUs only). The others: "graph" (a tf.function of the model
# as it is / compile(jit_compile=False)), "frozen" and "xla" (XLA forced on).
MODES = ("default", "graph", "frozen", "xla")


def build_case(kind, backbone, batch, size, precision="fp32", mode="default"):
    """One case's model and step.

    ``infer``: a forward pass (``training=False``) run as ``mode`` says. ``train``: one
    ``train_on_batch`` of the model with the aux head, CE + 0.4 x aux CE, SGD momentum;
    its FLOPs count as 3x the forward pass (forward, input and weight gradients).

    Returns:
        ``(model, step, conv FLOPs per image and step, what ran: graph kind and XLA)``.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from pspnet_tf import build_pspnet
    from pspnet_tf.infer.predictor import frozen_function

    if mode not in MODES or (kind == "train" and mode == "frozen"):
        raise ValueError(f"mode {mode!r} is not one of {MODES} for {kind}")
    if precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)), tf.float32)
    model = build_pspnet(NUM_CLASSES, backbone, (size, size, 3), aux_head=kind == "train")
    flops = conv_flops(model)
    if kind == "infer":
        if mode in ("default", "frozen"):
            forward, ran = frozen_function(model, (None, size, size, 3)), "frozen graph, XLA off"
        else:
            xla = mode == "xla"
            forward = tf.function(lambda x: model(x, training=False), jit_compile=xla)
            ran = f"tf.function, XLA {'on' if xla else 'off'}"
        return model, (lambda: forward(images).numpy()), flops, ran
    labels = tf.constant(rng.integers(0, NUM_CLASSES, (batch, size, size)), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss={"main": loss, "aux": loss},
        loss_weights={"main": 1.0, "aux": 0.4},
        jit_compile={"default": "auto", "graph": False, "xla": True}[mode],
    )
    targets = {"main": labels, "aux": labels}
    step = lambda: model.train_on_batch(images, targets)  # noqa: E731
    step()  # compiles; Keras resolves "auto" here
    ran = f"model.fit step, XLA {'on' if model.jit_compile else 'off'}"
    return model, step, 3 * flops, ran


def run_case(kind, backbone, batch, size, precision="fp32", runs=10, warmup=2, mode="default"):
    """Times one case in this process; returns a JSON-ready dict."""
    from pspnet_tf import machine

    _, step, flops, ran = build_case(kind, backbone, batch, size, precision, mode)
    for _ in range(warmup):
        step()
    return {
        "kind": kind, "backbone": backbone, "batch": batch, "size": size,
        "precision": precision, "mode": mode, "times": [timed(step) for _ in range(runs)],
        "flops_per_image": flops, "peak_rss_mb": peak_rss_mb(),
        "ran": ran, "machine": machine.describe(),
    }  # fmt: skip


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args, threads, script=None):
    """Runs ``python -m pspnet_tf.benchmark --child ...`` (or ``script``) in a fresh process.

    Returns the JSON result the child prints last.
    """
    command = list(script) if script else ["-m", "pspnet_tf.benchmark"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(threads))
    env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1")
    out = subprocess.run(
        [sys.executable, *command, "--child", *map(str, args)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"benchmark case {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(result, peaks):
    """Latency statistics, throughput and fraction of the measured peak of one case."""
    median = statistics.median(result["times"])
    passes = 3 if result["kind"] == "train" else 1  # forward FLOPs shown; train counts 3x
    achieved = result["flops_per_image"] * result["batch"] / median / 1e9
    peak = peaks["bfloat16" if result["precision"] == "bf16" else "float32"]
    return {
        **{k: result[k] for k in ("kind", "backbone", "batch", "size", "precision", "mode")},
        "median_s": median, "min_s": min(result["times"]), "max_s": max(result["times"]),
        "images_per_s": result["batch"] / median,
        "gflop_per_image": result["flops_per_image"] / 1e9 / passes,
        "achieved_gflops": achieved, "fraction_of_peak": achieved / peak,
        "peak_rss_mb": result["peak_rss_mb"], "ran": result["ran"],
        "machine": result["machine"],
    }  # fmt: skip


def format_table(rows, peaks):
    """The benchmark table as text: the machine, the timings, what each case ran."""
    lines = [
        *sorted({f"machine: {r['machine']}" for r in rows}),
        f"matmul peak (measured): fp32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.0f} GFLOP/s",
        f"{'case':<34} {'median':>8} {'min-max (ms)':>14} {'img/s':>7} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'peak':>5} {'RSS MB':>7}",
    ]
    for r in rows:
        case = _case(r)
        lines.append(
            f"{case:<34} {r['median_s'] * 1000:>6.0f}ms {r['min_s'] * 1000:>6.0f}-"
            f"{r['max_s'] * 1000:<7.0f} {r['images_per_s']:>7.2f} {r['gflop_per_image']:>9.1f} "
            f"{r['achieved_gflops']:>8.0f} {r['fraction_of_peak']:>5.0%} {r['peak_rss_mb']:>7.0f}"
        )
    lines += [f"  {_case(r)}: {r['ran']}" for r in rows]
    return "\n".join(lines)


def _case(r):
    mode = "" if r["mode"] == "default" else f" {r['mode']}"
    return f"{r['backbone']} {r['kind']} {r['size']} b{r['batch']} {r['precision']}{mode}"


def measure_peaks(threads):
    """Matmul GFLOP/s per dtype; NaN where the dtype's matmul does not run here (bfloat16
    through oneDNN limited to AVX2 aborts the process: no bf16 kernel)."""
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        try:
            peaks[dtype] = run_child(["peak", dtype], threads)["gflops"]
        except RuntimeError:
            peaks[dtype] = float("nan")
    return peaks


def _child(args):
    if args[0] == "peak":
        return {"gflops": peak_gflops(args[1])}
    kind, backbone, batch, size, precision, runs, mode = args[1:8]
    return run_case(kind, backbone, int(batch), int(size), precision, int(runs), mode=mode)


def add_arguments(parser):
    """The benchmark's options (shared by ``pspnet-tf benchmark`` and ``python -m``)."""
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 and ResNet-50, 5 runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--backbones", nargs="+", default=None, choices=BACKBONES)
    parser.add_argument(
        "--modes", nargs="+", default=["default"], choices=MODES,
        help="default: what pspnet_tf runs here (frozen inference graph, Keras' XLA choice); "
        "graph: plain tf.function / jit_compile=False; frozen; xla: XLA forced on",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pspnet-tf benchmark", description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


def run(args):
    """Runs the benchmark for parsed arguments; prints the table."""
    if args.child:  # one measurement in a fresh process, JSON on stdout
        print(json.dumps(_child(args.child)))
        return 0
    runs = args.runs or (5 if args.quick else 10)
    backbones = args.backbones or (("mobilenetv2", "resnet50") if args.quick else BACKBONES)
    peaks = measure_peaks(args.threads)
    rows = []
    for kind, batch, size in QUICK_CASES if args.quick else FULL_CASES:
        for backbone in backbones:
            if backbone == "resnet101" and size != 473:
                continue
            for precision in args.precision:
                for mode in args.modes:
                    if kind == "train" and mode == "frozen":
                        continue
                    case = ["case", kind, backbone, batch, size, precision, runs, mode]
                    rows.append(summarise(run_child(case, args.threads), peaks))
                    print(format_table(rows[-1:], peaks).splitlines()[-2], flush=True)
    print(format_table(rows, peaks))
    if args.json:
        result = {"threads": args.threads, "peaks": peaks, "rows": rows}
        write_json(args.json, result, kind=JSON_OBJECT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
