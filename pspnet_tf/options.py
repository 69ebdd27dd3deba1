"""The words each option takes, in one place.

Every module that takes one of these options reads its choices from here, and so does the
command line, which builds ``--help`` without loading TensorFlow (this module imports
nothing).
"""

BACKBONES = ("resnet50", "resnet101", "mobilenetv2")
# 8: the paper's dilated network; 16: only the last stage dilated; 32: no dilation.
OUTPUT_STRIDES = (8, 16, 32)
# Dataset folder layouts (pspnet_tf.data.layouts).
LAYOUTS = ("voc", "cityscapes", "ade20k", "list")
# Evaluation and prediction modes of the paper (pspnet_tf.infer.modes).
MODES = ("single", "sliding", "multiscale")
# What predict writes for each image (pspnet_tf.infer.predict).
OUTPUTS = ("labels", "masks", "overlays")
# Export formats (pspnet_tf.infer.export; "tflite" is "litert"'s former name) and LiteRT
# quantisations (pspnet_tf.infer.litert).
FORMATS = ("saved_model", "litert", "tflite", "onnx")
LITERT_QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# Training (pspnet_tf.training.config, pspnet_tf.training.distributed).
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("auto", "none", "mirrored", "multi_worker")
# Published checkpoints' sources that pspnet_tf.weights.convert reads.
WEIGHT_SOURCES = ("bubbliiiing", "caffe", "semseg")
