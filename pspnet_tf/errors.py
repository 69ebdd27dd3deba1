"""Errors as the one line a user reads."""

from __future__ import annotations

import re


def one_line(error):
    """An exception's own words on one line.

    A file error keeps its file name; a TensorFlow error loses its graph node and op names
    (``{{node ...}}``, ``[[...]]``, ``[Op:...]``), which say nothing to a user.

    Args:
        error: an exception.

    Returns:
        str, never empty (the exception's class name if it has no message).
    """
    message = getattr(error, "message", None)
    if isinstance(message, str) and type(error).__module__.startswith("tensorflow"):
        text = re.sub(r"\{\{[^}]*\}\}", "", message).split("\n")[0]
        text = re.split(r"\s\[\[|\s\[Op:", text)[0]
    elif isinstance(error, OSError) and error.filename and str(error.filename) not in str(error):
        text = f"{error.strerror or error}: {error.filename}"
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__
