"""pspnet_tf against a PyTorch eager implementation of the same network, same machine.

Usage: python benchmarks/speed.py [--quick] [--runs 10] [--threads 2] [--json FILE]
           [--cases "mobilenetv2 infer 473 b1 fp32" ...] [--no-memory]

For each case (inference at 473 batch 1; training steps at 320 batch 4 and 473 batch 2)
and precision (fp32; bf16 = Keras mixed_bfloat16 vs torch.autocast bfloat16), one child
process builds both models with the same weights, checks that parameter counts and
convolution FLOPs agree (and fp32 inference logits), then times them alternately
(TF, PyTorch, TF, PyTorch, ...). Peak memory comes from separate processes, one per
framework and case. Prints the machine (CPU, ISA features, oneDNN on or off), the
measured fp32/bf16 matmul peak, and a table with ours/PyTorch ratios and each row's
GFLOP/s as a fraction of that peak; below it, what each case ran (frozen graph or
tf.function, XLA on or off). ``--modes`` adds other ways of running ours (see
:data:`pspnet_tf.benchmark.MODES`); ``--json`` writes it all.

An AVX2-only CPU can be emulated on an AVX-512 one: ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN in
both frameworks) and ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's own kernels), with
``TF_ENABLE_ONEDNN_OPTS=0`` for TensorFlow's default on a real AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pspnet_tf import benchmark as bench  # noqa: E402
from pspnet_tf.files import write_json  # noqa: E402


def torch_case(keras_model, kind, backbone, batch, size, precision, threads):
    """The PyTorch twin of a Keras case; returns ``(step, torch_model)``."""
    import torch
    import torch_pspnet

    torch.set_num_threads(threads)
    from pspnet_tf import get_metadata

    bins = tuple(get_metadata(keras_model)["architecture"]["bins"])  # 1,2,4,8 at 320 and 512
    model = torch_pspnet.PSPNet(bench.NUM_CLASSES, backbone, aux_head=kind == "train", bins=bins)
    torch_pspnet.load_from_keras(model, keras_model)
    x = torch.rand(batch, 3, size, size) * 255
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    if precision == "bf16":  # channels-last is faster for bf16 convolutions on oneDNN
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    if kind == "infer":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)

        return step, model
    model.train()
    labels = torch.randint(0, bench.NUM_CLASSES, (batch, size, size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            main, aux = model(x)
            loss = loss_fn(main.float(), labels) + 0.4 * loss_fn(aux.float(), labels)
        loss.backward()
        optimizer.step()

    return step, model


def check_twins(keras_model, torch_model, kind, size):
    """Parameter counts, FLOPs and (fp32 inference) logits of the two models agree."""
    import numpy as np
    import torch
    import torch_pspnet

    torch_params = sum(p.numel() for p in torch_model.parameters())
    torch_params += sum(b.numel() for n, b in torch_model.named_buffers() if "running" in n)
    keras_flops = bench.conv_flops(keras_model)
    torch_flops = torch_pspnet.conv_flops(torch_model, size, size)
    result = {
        "params": [keras_model.count_params(), torch_params],
        "flops": [keras_flops, torch_flops],
    }
    if kind == "infer":
        x = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype("float32")
        ours = keras_model(x, training=False).numpy()
        with torch.no_grad():
            theirs = torch_model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        result["max_rel_diff"] = float(np.abs(ours - theirs.numpy()).max() / np.abs(ours).max())
    return result


def run_pair(kind, backbone, batch, size, precision, runs, threads, mode, warmup=2):
    """Child process: both frameworks, alternating timings."""
    from pspnet_tf import machine

    keras_model, tf_step, flops, ran = bench.build_case(
        kind, backbone, batch, size, precision, mode
    )
    torch_step, torch_model = torch_case(
        keras_model, kind, backbone, batch, size, precision, threads
    )
    check = check_twins(keras_model, torch_model.float(), kind, size) if precision == "fp32" else {}
    for _ in range(warmup):
        tf_step()
        torch_step()
    tf_times, torch_times = [], []
    for _ in range(runs):
        tf_times.append(bench.timed(tf_step))
        torch_times.append(bench.timed(torch_step))
    return {
        "tf": tf_times, "torch": torch_times, "check": check, "step_flops": flops,
        "ran": ran, "machine": machine.describe(),
    }  # fmt: skip


def run_memory(framework, kind, backbone, batch, size, precision, threads, mode, steps=3):
    """Child process: peak resident memory of a few steps of one framework alone."""
    keras_model, step, _, _ = bench.build_case(kind, backbone, batch, size, precision, mode)
    if framework == "torch":
        step, _ = torch_case(keras_model, kind, backbone, batch, size, precision, threads)
        del keras_model
    for _ in range(steps):
        step()
    return {"peak_rss_mb": bench.peak_rss_mb()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--cases", nargs="+", default=None, help='only these, e.g. "resnet50 train 320 b4 fp32"'
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--modes", nargs="+", default=["default"], choices=bench.MODES)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, *rest = args.child
        kind, backbone, batch, size, precision, ours = rest[:6]
        case = (kind, backbone, int(batch), int(size), precision)
        if mode == "pair":
            out = run_pair(*case, int(rest[6]), args.threads, ours)
        else:
            out = run_memory(mode, *case, args.threads, ours)
        print(json.dumps(out))
        return 0
    runs = args.runs or (5 if args.quick else 10)
    backbones = ("mobilenetv2", "resnet50") if args.quick else bench.BACKBONES
    peaks = bench.measure_peaks(args.threads)
    rows = []
    for kind, batch, size in bench.QUICK_CASES if args.quick else bench.FULL_CASES:
        for backbone in backbones:
            if backbone == "resnet101" and size != 473:
                continue
            for precision in ("fp32", "bf16"):
                for mode in args.modes:
                    case = f"{backbone} {kind} {size} b{batch} {precision}"
                    if (args.cases and case not in args.cases) or (kind, mode) == (
                        "train",
                        "frozen",
                    ):
                        continue
                    case = [kind, backbone, batch, size, precision, mode]
                    rows.append(_measure(case, runs, args, peaks))
                    print(_format_row(rows[-1]), flush=True)
    print()
    for line in sorted({f"machine: {r['machine']}" for r in rows}):
        print(line)
    print(f"matmul peak (measured, {args.threads} threads): fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s")  # fmt: skip
    print(_HEADER)
    for row in rows:
        print(_format_row(row))
    for row in rows:
        print(f"  {row['case']}: {row['ran']}")
    if args.json:
        write_json(args.json, {"threads": args.threads, "peaks": peaks, "rows": rows})
    return 0


def _measure(case, runs, args, peaks):
    kind, backbone, batch, size, precision, mode = case
    script = [os.path.abspath(__file__)]
    pair = bench.run_child(["pair", *case, runs], args.threads, script=script)
    memory = {
        fw: float("nan")
        if args.no_memory
        else bench.run_child([fw, *case], args.threads, script=script)["peak_rss_mb"]
        for fw in ("tf", "torch")
    }
    step_flops = pair["step_flops"]  # per image, x3 for a training step
    tf_median, torch_median = statistics.median(pair["tf"]), statistics.median(pair["torch"])
    peak = peaks["bfloat16" if precision == "bf16" else "float32"]
    return {
        "case": f"{backbone} {kind} {size} b{batch} {precision}"
        + ("" if mode == "default" else f" {mode}"),
        "tf_median_s": tf_median, "tf_min_s": min(pair["tf"]), "tf_max_s": max(pair["tf"]),
        "torch_median_s": torch_median, "ratio": tf_median / torch_median,
        "tf_images_per_s": batch / tf_median, "torch_images_per_s": batch / torch_median,
        "tf_fraction_of_peak": step_flops * batch / tf_median / 1e9 / peak,
        "tf_rss_mb": memory["tf"], "torch_rss_mb": memory["torch"], "check": pair["check"],
        "ran": pair["ran"], "machine": pair["machine"], "timestamp": time.time(),
    }  # fmt: skip


_HEADER = (
    f"{'case':<34} {'ours':>8} {'PyTorch':>8} {'ours/PT':>7} {'%peak':>6} "
    f"{'RSS ours':>9} {'RSS PT':>8}"
)


def _format_row(r):
    peak = f"{r['tf_fraction_of_peak']:.0%}"
    return (
        f"{r['case']:<34} {r['tf_median_s'] * 1000:>6.0f}ms {r['torch_median_s'] * 1000:>6.0f}ms "
        f"{r['ratio']:>7.2f} {peak:>6} {r['tf_rss_mb']:>7.0f}MB {r['torch_rss_mb']:>6.0f}MB"
    )


if __name__ == "__main__":
    sys.exit(main())
