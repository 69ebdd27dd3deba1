"""Training time per epoch on the generated demo dataset, per backbone.

Runs the real training step (``compile_for_training``: SGD, poly schedule, CE on main
and aux, metrics) on the real pipeline (``load_dataset`` with the paper's augmentation)
and times a few steps after the first ones (which trace the graph), then scales to one
epoch (``num_train / batch_size`` steps). Each backbone runs in its own process so one
does not slow the next.

    python benchmarks/train_epoch.py                      # MobileNetV2 and ResNet-50, 320 crop
    python benchmarks/train_epoch.py --backbones mobilenetv2 --steps 5 --crop-size 473
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(args):
    """One backbone in this process; prints a JSON line with the timings."""
    import keras

    from pspnet_tf import build_pspnet
    from pspnet_tf.data.demo import DEMO_CLASSES, make_demo_dataset
    from pspnet_tf.data.pipeline import load_dataset
    from pspnet_tf.training.recipe import compile_for_training

    root = make_demo_dataset(
        args.data, num_train=args.num_train, num_val=8, size=args.crop_size, seed=0
    )
    steps_per_epoch = args.num_train // args.batch_size
    dataset = load_dataset(
        root, "voc", "train", len(DEMO_CLASSES), args.crop_size, args.batch_size,
        training=True, seed=0, aux_targets=True, drop_remainder=True,
    ).repeat()  # fmt: skip
    model = build_pspnet(
        len(DEMO_CLASSES), args.backbone, (args.crop_size, args.crop_size, 3), aux_head=True
    )
    compile_for_training(model, total_steps=1000)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the step to finish
            times.append(time.perf_counter() - self.start)

    model.fit(
        dataset, epochs=1, steps_per_epoch=args.warmup + args.steps, callbacks=[Timer()], verbose=0
    )
    per_step = sum(times[args.warmup :]) / args.steps
    result = {
        "backbone": args.backbone,
        "params_m": model.count_params() / 1e6,
        "first_step_s": times[0],
        "step_s": per_step,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": per_step * steps_per_epoch,
    }
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv2", "resnet50"])
    parser.add_argument("--crop-size", type=int, default=320, help="the demo's crop")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=240, help="the demo's training images")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (tracing)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--backbone", help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backbone:
        return measure(args)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for backbone in args.backbones:
            command = [sys.executable, __file__, "--backbone", backbone, "--data", folder]
            for flag in ("crop_size", "batch_size", "num_train", "warmup", "steps"):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"training on the demo dataset: crop {args.crop_size}, batch {args.batch_size}, "
        f"{args.num_train} images/epoch, float32, {os.cpu_count()} CPUs"
    )
    print("| backbone | params (M) | first step (s) | s/step | steps/epoch | s/epoch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['params_m']:.1f} | {r['first_step_s']:.1f} | "
            f"{r['step_s']:.2f} | {r['steps_per_epoch']} | {r['epoch_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
