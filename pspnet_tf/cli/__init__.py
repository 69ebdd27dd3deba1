"""The ``pspnet-tf`` command line (also ``python -m pspnet_tf``).

Each subcommand is a small function taking the parsed arguments; its imports happen
inside it, so ``--help`` and ``--version`` never load TensorFlow. :func:`console` (the
installed command) silences TensorFlow's start-up log lines for its own process;
:func:`main` changes nothing, so tests and scripts can call it in-process.

Environment: ``TF_ENABLE_ONEDNN_OPTS`` (0 or 1) turns TensorFlow's oneDNN kernels off or
on (the README's performance section says when each helps); ``PSPNET_TF_DEBUG=1`` shows
tracebacks.
"""

from __future__ import annotations

import os
import sys

from pspnet_tf.cli.commands import DEBUG_VARIABLE, UsageError
from pspnet_tf.cli.parser import build_parser
from pspnet_tf.errors import one_line

__all__ = ["DEBUG_VARIABLE", "UsageError", "build_parser", "console", "main"]


def _log_to_stderr():
    """The library's messages (the ``pspnet_tf`` logger) as ``pspnet-tf: ...`` lines."""
    import logging

    log = logging.getLogger("pspnet_tf")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pspnet-tf: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _quiet_tensorflow():
    """Imports TensorFlow with its start-up lines silenced (this process only).

    ``TF_CPP_MIN_LOG_LEVEL`` (unless the user set it) quiets the later ones; the first
    lines come from C++ before logging is set up, so file descriptor 2 goes to a
    temporary file while TensorFlow and Keras load and TensorFlow finds its devices (where
    a CUDA build finds no driver it says so then), replayed if that fails.
    """
    import tempfile

    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import keras  # noqa: F401  (loads more of TensorFlow, which speaks again)
            import tensorflow

            tensorflow.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def console():
    """The installed ``pspnet-tf`` command: :func:`main` with TensorFlow's start-up quiet."""
    argv = sys.argv[1:]
    if argv and not {"-h", "--help", "--version"} & set(argv):  # help never loads TensorFlow
        _quiet_tensorflow()
    sys.exit(main(argv))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr()
    if args.version:
        from pspnet_tf import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as error:
        # User errors (bad value, bad file, bad data) end in one line naming the flag or
        # file; --debug keeps the traceback for a bug report.
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        code = 2 if isinstance(error, UsageError) else 1
        print(f"pspnet-tf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return code
