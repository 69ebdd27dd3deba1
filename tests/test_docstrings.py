"""The ``>>>`` examples in the package's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import pspnet_tf

MODULES = ["pspnet_tf"] + sorted(
    info.name
    for info in pkgutil.walk_packages(pspnet_tf.__path__, prefix="pspnet_tf.")
    if not info.name.endswith("__main__")  # importing it runs the command line
)


def _examples(name):
    module = importlib.import_module(name)
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


WITH_EXAMPLES = [name for name in MODULES if _examples(name)]


def test_the_examples_are_found():
    # The modules known to carry examples; a finder that found none would pass vacuously.
    assert {"pspnet_tf", "pspnet_tf.model.build", "pspnet_tf.metrics", "pspnet_tf.losses"} <= set(
        WITH_EXAMPLES
    )


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
