"""Errors as one line: the exception's words, its file, no TensorFlow node names."""

import tensorflow as tf

from pspnet_tf.errors import one_line


def test_a_tensorflow_error_loses_its_node_names():
    error = tf.errors.InvalidArgumentError(
        None, None, "jpeg::Uncompress failed. Invalid JPEG data. [[{{node DecodeJpeg}}]] "
        "[Op:IteratorGetNext]\nmore lines"
    )  # fmt: skip
    assert one_line(error) == "jpeg::Uncompress failed. Invalid JPEG data."


def test_a_file_error_keeps_its_file_and_other_errors_their_words():
    assert one_line(FileNotFoundError(2, "No such file or directory", "x.png")).endswith("x.png'")
    assert one_line(ValueError("two\n   lines")) == "two lines"
    assert one_line(KeyError()) == "KeyError"
