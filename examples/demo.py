"""The main job from Python: ``python examples/demo.py [--quick] [--output DIR]``.

Same as ``pspnet-tf demo``: generates a dataset, trains PSPNet-MobileNetV2 at 320x320,
evaluates, draws pictures and exports a SavedModel. See pspnet_tf/demo.py.
"""

import argparse

from pspnet_tf.demo import run_demo

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output", default="pspnet_demo")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
summary = run_demo(args.output, quick=args.quick)
print(f"val mIoU (single scale): {summary['val_miou']['single']:.3f}")
