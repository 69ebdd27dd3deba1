"""The optimizer and learning rate schedule of the paper's recipe.

- :class:`CoupledDecaySGD`: SGD with momentum and L2 weight decay added to the
  gradient (PyTorch ``torch.optim.SGD`` semantics), with optional per-layer
  learning rate multipliers (10x on the head).
- :class:`PolyDecay`: the poly learning rate ``lr0 * (1 - step / steps) ** 0.9``
  (Keras' ``PolynomialDecay``), with optional linear warm-up.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="pspnet_tf")
class CoupledDecaySGD(keras.optimizers.SGD):
    """SGD with momentum and coupled L2 weight decay, as PyTorch's ``torch.optim.SGD``.

    Per variable: ``g = grad + l2_decay * w``; ``buf = momentum * buf + g``;
    ``w -= lr * multiplier * buf`` (Nesterov: ``w -= lr * multiplier * (g + momentum
    * buf)``). Keras' ``SGD(weight_decay=)`` instead shrinks the weights outside the
    gradient (decoupled), which with momentum 0.9 is about 10x weaker; and Keras'
    SGD keeps ``lr * grad`` in its momentum buffer (as Caffe), which differs from
    PyTorch once the learning rate changes. Every trainable variable is decayed,
    BatchNorm scales and biases included (PyTorch's default, also hszhao's PSPNet
    training code); frozen (non-trainable) variables get no gradient and no decay.

    Args:
        learning_rate: float or a ``LearningRateSchedule``. Defaults to 0.01.
        momentum: float. Defaults to 0.9.
        l2_decay: float. Coupled weight decay. Defaults to 1e-4 (the paper).
        lr_multipliers: dict of layer-name prefix -> learning rate multiplier, e.g.
            ``{"ppm_": 10.0, "main_": 10.0, "aux_": 10.0}``; a variable takes the
            first prefix its layer name starts with, else 1.
        nesterov: bool. Defaults to False.
        **kwargs: base ``keras.optimizers.Optimizer`` arguments (``weight_decay``
            must stay None: use ``l2_decay``).
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        l2_decay=1e-4,
        lr_multipliers=None,
        nesterov=False,
        name="coupled_decay_sgd",
        **kwargs,
    ):
        if kwargs.get("weight_decay"):
            raise ValueError("CoupledDecaySGD takes l2_decay, not (decoupled) weight_decay")
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            name=name,
            **kwargs,
        )
        self.l2_decay = float(l2_decay)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._multipliers = [self._multiplier(v.path) for v in variables]

    def _multiplier(self, path):
        # ".../<layer name>/<variable name>"; a model name may come first (Sequential).
        layer_name = path.split("/")[-2] if "/" in path else ""
        return next(
            (m for prefix, m in self.lr_multipliers.items() if layer_name.startswith(prefix)),
            1.0,
        )

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        index = self._get_variable_index(variable)
        lr = ops.cast(learning_rate * self._multipliers[index], variable.dtype)
        gradient = ops.add(ops.cast(gradient, variable.dtype), self.l2_decay * variable)
        step = gradient
        if self.momentum:
            buf = self.momentums[index]
            self.assign(buf, ops.add(ops.multiply(buf, self.momentum), gradient))
            step = ops.add(gradient, ops.multiply(buf, self.momentum)) if self.nesterov else buf
        self.assign_sub(variable, ops.multiply(step, lr))

    def get_config(self):
        config = super().get_config()
        config.update(l2_decay=self.l2_decay, lr_multipliers=dict(self.lr_multipliers))
        return config


@keras.saving.register_keras_serializable(package="pspnet_tf")
class PolyDecay(keras.optimizers.schedules.PolynomialDecay):
    """Poly learning rate ``lr0 * (1 - step / decay_steps) ** power`` with linear warm-up.

    Keras' ``PolynomialDecay`` (to 0, per step) times ``min(1, (step + 1) /
    warmup_steps)`` during the first ``warmup_steps`` steps.

    Args:
        initial_learning_rate: float. Defaults to 0.01 (the paper).
        decay_steps: int. Total training steps.
        power: float. Defaults to 0.9 (the paper).
        warmup_steps: int. Defaults to 0 (no warm-up).
        **kwargs: other ``PolynomialDecay`` arguments.
    """

    def __init__(self, initial_learning_rate=0.01, decay_steps=1, power=0.9, warmup_steps=0, **kw):
        kw.setdefault("end_learning_rate", 0.0)
        super().__init__(initial_learning_rate, max(int(decay_steps), 1), power=power, **kw)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        lr = super().__call__(step)
        if not self.warmup_steps:
            return lr
        ramp = (keras.ops.cast(step, lr.dtype) + 1.0) / self.warmup_steps
        return lr * keras.ops.minimum(ramp, 1.0)

    def get_config(self):
        return {**super().get_config(), "warmup_steps": self.warmup_steps}
