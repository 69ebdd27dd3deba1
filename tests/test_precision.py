"""One precision vocabulary for training, inference, export and the command line."""

import keras
import pytest

from pspnet_tf.cli import build_parser
from pspnet_tf.precision import PRECISIONS, dtype_policy, keras_policy, resolve_precision
from pspnet_tf.training.recipe import resolve_config


def test_every_command_takes_the_same_words():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for verb in ("train", "evaluate", "predict", "export"):
        (action,) = [a for a in subcommands[verb]._actions if a.dest == "precision"]
        assert tuple(action.choices) == PRECISIONS, verb


def test_words_resolve_to_keras_policies():
    assert [keras_policy(p) for p in ("float32", "bfloat16", "float16")] == [
        "float32",
        "mixed_bfloat16",
        "mixed_float16",
    ]
    # No GPU in the test environment: "mixed" is bfloat16 on a CPU.
    assert resolve_precision("mixed") == "bfloat16"
    assert resolve_precision(None) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(None, allow_none=False)
    with pytest.raises(ValueError, match="got 'fp16'"):
        resolve_precision("fp16")
    with dtype_policy("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"


def test_training_configs_take_the_precision_words():
    with pytest.raises(ValueError, match="got 'mixed_bfloat16'"):  # Keras' policy name is not one
        keras_policy("mixed_bfloat16")
    config = resolve_config({"num_classes": 2, "output": "out", "precision": "bfloat16"})
    assert config["precision"] == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_config({"num_classes": 2, "output": "out", "precision": "half"})
