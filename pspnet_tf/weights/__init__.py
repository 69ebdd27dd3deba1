"""Published PSPNet weights: the registry and the checkpoint converters.

- :mod:`pspnet_tf.weights.registry`: ``PRETRAINED`` (every published checkpoint with
  its source, licence and reported mIoU), ``describe``, ``fetch`` (download, verify
  and convert once), ``cache_dir``.
- :mod:`pspnet_tf.weights.convert`: ``convert_checkpoint``, ``read_checkpoint``,
  ``SOURCES`` (semseg, bubbliiiing and Caffe checkpoints to ``.keras`` models).

Loading weights by layer name (ImageNet backbones, ``.keras`` files) is
:mod:`pspnet_tf.model.named_weights`.
"""

from pspnet_tf.weights.convert import SOURCES, convert_checkpoint, read_checkpoint
from pspnet_tf.weights.registry import PRETRAINED, cache_dir, describe, fetch

__all__ = [
    "PRETRAINED",
    "SOURCES",
    "cache_dir",
    "convert_checkpoint",
    "describe",
    "fetch",
    "read_checkpoint",
]
