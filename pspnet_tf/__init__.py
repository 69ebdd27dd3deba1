"""pspnet_tf: PSPNet (Pyramid Scene Parsing Network) for Keras 3 on TensorFlow.

Example:
>>> from pspnet_tf import build_pspnet
>>> model = build_pspnet(num_classes=21, backbone="mobilenetv2", input_shape=(320, 320, 3))
"""

# Before TensorFlow loads: oneDNN where TF would leave it off, quiet start-up in the CLI.
from pspnet_tf import machine as _machine

_machine.prepare_tensorflow()

from pspnet_tf import layers  # noqa: E402, F401  (registers the custom layers for load_model)
from pspnet_tf.model import build_pspnet  # noqa: E402
from pspnet_tf.network import get_metadata, inference_model, rebuild, set_metadata  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_pspnet",
    "get_metadata",
    "inference_model",
    "rebuild",
    "set_metadata",
]
