"""Shared tiny fixtures and helpers for the test suite."""

import os

# Quiet TF's start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
