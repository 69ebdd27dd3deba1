"""The ``pspnet-tf`` command line (also ``python -m pspnet_tf``).

Each subcommand is a small function taking the parsed arguments; heavy imports
(TensorFlow) happen inside them so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pspnet-tf", description="PSPNet for Keras 3 / TensorFlow."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("summary", help="build a PSPNet and print its layers and parameter count")
    p.add_argument(
        "--backbone", default="mobilenetv2", choices=["resnet50", "resnet101", "mobilenetv2"]
    )
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--input-size", type=int, default=473, help="square input size; 0 for any size")
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32])
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    p.add_argument("--aux-head", action="store_true", help="add the auxiliary head")
    p.set_defaults(func=_summary)

    p = sub.add_parser("check-data", help="scan a dataset and report every bad file")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--layout", required=True, choices=["voc", "cityscapes", "ade20k", "list"])
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--split", nargs="+", default=["train", "val"], help="splits to check")
    p.add_argument("--list-file", help="split file (VOC ids or 'image label' pairs)")
    p.set_defaults(func=_check_data)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from pspnet_tf import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
