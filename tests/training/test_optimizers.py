"""CoupledDecaySGD against a numpy re-implementation of torch.optim.SGD; the poly schedule."""

import keras
import numpy as np
import pytest

from pspnet_tf.training.optimizers import CoupledDecaySGD, PolyDecay


def torch_sgd(weights, gradients, lrs, momentum, weight_decay, nesterov=False):
    """torch.optim.SGD's documented update (dampening 0), one learning rate per step."""
    w, buf = weights.astype("float64"), None
    for grad, lr in zip(gradients, lrs, strict=True):
        g = grad + weight_decay * w
        buf = g.copy() if buf is None else momentum * buf + g
        w = w - lr * (g + momentum * buf if nesterov else buf)
    return w


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_equals_pytorch_sgd_under_a_changing_learning_rate(rng, nesterov):
    steps, total = 5, 6
    schedule = PolyDecay(0.1, total, power=0.9)
    lrs = [0.1 * (1 - t / total) ** 0.9 for t in range(steps)]
    variables = {}
    for name in ("conv", "main_classifier"):  # the layer name decides the multiplier
        layer = keras.layers.Dense(4, use_bias=False, name=name)
        layer.build((None, 3))
        variables[name] = layer.kernel
    w0 = {k: rng.normal(size=(3, 4)).astype("float32") for k in variables}
    grads = {k: [rng.normal(size=(3, 4)) for _ in range(steps)] for k in variables}
    for key, value in w0.items():
        variables[key].assign(value)
    optimizer = CoupledDecaySGD(schedule, 0.9, 1e-2, {"main_": 10.0}, nesterov=nesterov)
    for t in range(steps):
        optimizer.apply_gradients([(grads[k][t].astype("float32"), variables[k]) for k in w0])
    for key, multiplier in (("conv", 1.0), ("main_classifier", 10.0)):
        expected = torch_sgd(
            w0[key], grads[key], [lr * multiplier for lr in lrs], 0.9, 1e-2, nesterov
        )
        np.testing.assert_allclose(variables[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations.numpy()) == steps


def test_multipliers_follow_layer_name_prefixes():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="conv1"),
            keras.layers.Dense(2, name="ppm_branch1_conv"),
            keras.layers.Dense(2, name="main_classifier"),
        ]
    )
    optimizer = CoupledDecaySGD(lr_multipliers={"ppm_": 10.0, "main_": 5.0})
    optimizer.build(model.trainable_variables)
    assert optimizer._multipliers == [1.0, 1.0, 10.0, 10.0, 5.0, 5.0]


def test_keras_weight_decay_is_not_what_we_do(rng):
    """Keras' SGD(weight_decay=) is decoupled: a test that the difference is real."""
    w0, grad = rng.normal(size=(5,)).astype("float32"), np.zeros(5, "float32")
    results = []
    for optimizer in (
        CoupledDecaySGD(0.1, 0.9, l2_decay=0.1),
        keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.1),
    ):
        var = keras.Variable(w0)
        for _ in range(3):
            optimizer.apply_gradients([(grad, var)])
        results.append(var.numpy())
    expected = torch_sgd(w0, [grad] * 3, [0.1] * 3, 0.9, 0.1)
    np.testing.assert_allclose(results[0], expected, rtol=1e-5)
    assert not np.allclose(results[1], expected, rtol=1e-3)
    with pytest.raises(ValueError, match="l2_decay"):
        CoupledDecaySGD(weight_decay=1e-4)


def test_optimizer_and_schedule_serialize():
    optimizer = CoupledDecaySGD(PolyDecay(0.02, 100, warmup_steps=5), 0.8, 3e-4, {"aux_": 10.0})
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, CoupledDecaySGD)
    assert (restored.l2_decay, restored.lr_multipliers) == (3e-4, {"aux_": 10.0})
    assert restored.momentum == 0.8
    assert isinstance(restored._learning_rate, PolyDecay)
    assert restored._learning_rate.get_config() == optimizer._learning_rate.get_config()


def test_poly_schedule_with_warmup():
    schedule = PolyDecay(0.01, 100, power=0.9, warmup_steps=4)
    got = [float(schedule(step)) for step in (0, 1, 3, 4, 50, 100, 150)]
    poly = [0.01 * (1 - s / 100) ** 0.9 for s in (0, 1, 3, 4, 50, 100, 100)]
    ramp = [0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(got, np.multiply(poly, ramp), rtol=1e-5, atol=1e-9)
    no_warmup = PolyDecay(0.01, 100)
    assert float(no_warmup(0)) == pytest.approx(0.01)
    assert float(no_warmup(100)) == 0.0
