"""Shared tiny fixtures and helpers for the test suite."""

import os

# The repository's root (tests live in folders below tests/).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Quiet TF's start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def randomize_batch_norm(model, seed=0):
    """Keras' initial weights with random BatchNorm statistics, scale and shift.

    Unlike :func:`randomize_weights`, the outputs are not chaotic in the weights (fully
    random deep networks amplify rounding tenfold): the model to compare precisions with.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, shape),
                    rng.normal(0, 0.1, shape),
                    rng.normal(0, 0.1, shape),
                    rng.uniform(0.5, 1.5, shape),
                ]
            )
    return model


def randomize_weights(model, seed=0):
    """Gives every weight of ``model`` a random, well-scaled value.

    Freshly initialised Keras models have BatchNorm statistics mean 0 / variance
    1 and zero biases, which hides bugs (e.g. a swapped mean and variance, or a
    shifted padding that only matters with non-zero inputs). Kernels get He
    scaling so activations stay O(1) through deep networks.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for var in layer.weights:
            shape = tuple(var.shape)
            path = var.path
            if path.endswith("moving_variance"):
                value = rng.uniform(0.5, 1.5, shape)
            elif path.endswith("gamma"):
                value = rng.uniform(0.5, 1.5, shape)
            elif path.endswith(("beta", "moving_mean", "bias")):
                value = rng.normal(0.0, 0.1, shape)
            else:
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
                if "depthwise" in path:
                    fan_in = int(np.prod(shape[:2]))
                value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            var.assign(value.astype(var.dtype))
    return model


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """Path of a tiny generated VOC-layout dataset: 8 train, 4 val images of 64x64, 6 classes.

    Classes are ``pspnet_tf.data.demo.DEMO_CLASSES``; read it with
    ``load_dataset(demo_dataset, "voc", "train", len(DEMO_CLASSES), ...)``.
    """
    from pspnet_tf.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "voc"
    return make_demo_dataset(root, num_train=8, num_val=4, size=64, seed=0)


@pytest.fixture
def pixelwise_model():
    """Factory of a tiny model with known logits: a 1x1 conv after a Preprocessing layer.

    ``make(kernel (3, C), bias (C,), input_shape=(None, None, 3), mean=..., std=...,
    channel_order="rgb", metadata=None)`` returns a Keras model whose logits are
    ``((image[..., order] - mean) / std) @ kernel + bias`` per pixel: flip- and
    translation-equivariant, so every evaluation mode has a numpy answer.
    """
    import keras

    from pspnet_tf.model.layers import Preprocessing

    def make(
        kernel,
        bias,
        input_shape=(None, None, 3),
        mean=(100.0, 120.0, 140.0),
        std=(50.0, 60.0, 70.0),
        channel_order="rgb",
        metadata=None,
    ):
        kernel = np.asarray(kernel, "float32")
        image = keras.Input(input_shape, name="image")
        x = Preprocessing(mean, std, channel_order, metadata=metadata, name="preprocessing")(image)
        conv = keras.layers.Conv2D(kernel.shape[1], 1, name="classifier")
        model = keras.Model(image, conv(x), name="pixelwise")
        conv.set_weights([kernel[None, None], np.asarray(bias, "float32")])
        return model

    return make


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small generated demo dataset (VOC layout, 6 classes, 64x64): 16 train, 8 val."""
    from pspnet_tf.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_dataset(root, num_train=16, num_val=8, size=64, seed=0, difficulty=0.0)


def tiny_pspnet(aux_head=True, num_classes=3, size=32):
    """A MobileNetV2 alpha 0.35 PSPNet of ``size`` squares, seeded, without dropout."""
    import keras

    from pspnet_tf import build_pspnet

    keras.utils.set_random_seed(0)
    return build_pspnet(
        num_classes, "mobilenetv2", (size, size, 3), alpha=0.35, aux_head=aux_head, dropout=0.0
    )


@pytest.fixture(scope="module")
def tiny_batch():
    """Eight random 32x32 images and 3-class labels whose first 4 rows are ignored (255)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, (8, 32, 32)).astype("int32")
    labels[:, :4] = 255
    return images, labels


# The pixelwise model of the evaluation, prediction and inference tests, and numpy
# computations of what it and the resizes give.
KERNEL = np.array([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, -2.0]])
BIAS = np.array([0.1, -0.2, 0.05])
MEAN, STD = np.array([100.0, 120.0, 140.0]), np.array([50.0, 60.0, 70.0])


def numpy_logits(image):
    """``pixelwise_model(KERNEL, BIAS)``'s logits, computed in numpy (float64)."""
    return ((np.asarray(image, np.float64) - MEAN) / STD) @ KERNEL + BIAS


def numpy_resize(array, size):
    """Bilinear resize with half-pixel centres (tf.image.resize, OpenCV INTER_LINEAR)."""

    def axis(n_out, n_in):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(x).astype(int)
        return low, np.minimum(low + 1, n_in - 1), x - low

    (y0, y1, fy), (x0, x1, fx) = axis(size[0], array.shape[0]), axis(size[1], array.shape[1])
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = array[y0][:, x0] * (1 - fx) + array[y0][:, x1] * fx
    bottom = array[y1][:, x0] * (1 - fx) + array[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
