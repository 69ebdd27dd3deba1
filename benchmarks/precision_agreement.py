"""How often reduced-precision inference gives the float32 labels, on a trained model.

Usage: python benchmarks/precision_agreement.py MODEL.keras DATA [--layout voc]
           [--split val] [--precision bfloat16] [--crop-size 224] [--max-images N] [--json F]

For every image of the split, the labels of the float32 inference graph and of the same graph
in ``--precision`` are compared pixel by pixel (single scale and sliding window), and both
are scored against the ground truth. Prints the agreement and the two mIoUs per mode; the
issue's target for bfloat16 is >= 99.5% agreement. Wall time of each precision is printed
too, but it includes image loading and the first trace: use ``benchmarks/speed.py`` for speed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def agreement(model, dataset, precision, modes, max_images=None):
    """``{mode: {"agreement", "miou_float32", "miou_<precision>", "seconds_..."}}``."""
    from pspnet_tf.infer.modes import predict_scores
    from pspnet_tf.infer.predictor import as_predictor
    from pspnet_tf.metrics import confusion_matrix, scores_from_confusion

    predictors = {
        "float32": as_predictor(model, precision="float32"),
        precision: as_predictor(model, precision=precision),
    }
    num_classes = predictors["float32"].num_classes
    results = {}
    for mode, options in modes.items():
        same = total = 0
        confusion = {name: np.zeros((num_classes, num_classes), np.int64) for name in predictors}
        seconds = dict.fromkeys(predictors, 0.0)
        for index, (image, label) in enumerate(dataset):
            if max_images is not None and index >= max_images:
                break
            image, label = np.asarray(image)[0], np.asarray(label)[0]
            labels = {}
            for name, predictor in predictors.items():
                start = time.perf_counter()
                labels[name] = predict_scores(predictor, image, mode, **options).argmax(-1)
                seconds[name] += time.perf_counter() - start
                confusion[name] += confusion_matrix(label, labels[name], num_classes).numpy()
            same += int((labels["float32"] == labels[precision]).sum())
            total += labels["float32"].size
        results[mode] = {
            "agreement": same / total,
            **{f"miou_{n}": scores_from_confusion(c)["miou"] for n, c in confusion.items()},
            **{f"seconds_{n}": s for n, s in seconds.items()},
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".keras model file")
    parser.add_argument("data", help="dataset folder")
    parser.add_argument("--layout", default="voc", choices=["voc", "cityscapes", "ade20k"])
    parser.add_argument("--split", default="val")
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--crop-size", type=int, default=224, help="sliding window size")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import keras

    import pspnet_tf  # noqa: F401  (registers the custom layers)
    from pspnet_tf.data.pipeline import load_dataset

    model = keras.models.load_model(args.model, compile=False)
    num_classes = model.output_shape["main"][-1] if isinstance(model.output, dict) else None
    num_classes = num_classes or model.output_shape[-1]
    dataset = load_dataset(args.data, args.layout, args.split, num_classes, batch_size=1)
    modes = {"single": {}, "sliding": {"crop_size": args.crop_size}}
    results = agreement(model, dataset, args.precision, modes, args.max_images)
    print(f"{'mode':<8} {'labels agree':>12} {'mIoU float32':>12} {'mIoU ' + args.precision:>14}")
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['agreement']:>12.4%} {r['miou_float32']:>12.4f} "
            f"{r['miou_' + args.precision]:>14.4f}"
        )
    if args.json:
        from pspnet_tf.files import write_json

        write_json(args.json, {"model": args.model, "precision": args.precision, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
