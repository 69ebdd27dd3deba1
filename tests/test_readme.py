"""The README's Python blocks run as written and print what their comments say.

A ``print(...)  # VALUE`` line (or ``# VALUE: explanation``) in a block must print VALUE;
prints without such a comment (figures that depend on training) only have to run.
"""

import ast
import pathlib
import re
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def expected_prints(source):
    """``[(first line, last line, expected text)]`` of the commented print statements."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        call = node.value if isinstance(node, ast.Expr) else None
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print"):
            continue
        comment = lines[node.end_lineno - 1].partition("  # ")[2].strip()
        if comment:
            found.append((node.lineno, node.end_lineno, comment.split(": ")[0]))
    return found


def test_the_readme_states_printed_values():
    # The comparison below is not vacuous: the README pins several printed values.
    assert sum(len(expected_prints(block)) for block in BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = []
    name = f"README.md block {index}"

    def record(*values, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != name:
            frame = frame.f_back
        printed.append((frame.f_lineno if frame else None, " ".join(map(str, values))))
        print(*values, **kwargs)

    exec(compile(BLOCKS[index], name, "exec"), {"print": record})
    for first, last, expected in expected_prints(BLOCKS[index]):
        outputs = [text for line, text in printed if line is not None and first <= line <= last]
        assert outputs == [expected], (
            f"{name}, line {first}: printed {outputs}, README says {expected!r}"
        )
