"""What machine this is, and the TensorFlow start-up settings chosen before it loads."""

import os
import subprocess
import sys
import textwrap

import pytest

from pspnet_tf import machine


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma"}, False),  # Zen 2/3, most Intel laptops and desktops: TF leaves it off
        ({"avx2", "fma", "avx512f", "avx512_vnni"}, True),
        ({"avx2", "avx512f", "avx512_bf16"}, True),
        ({"avx2", "amx_tile", "amx_bf16"}, True),
        (set(), None),  # no /proc/cpuinfo: cannot tell
    ],
)
def test_onednn_default_follows_tensorflows_rule(monkeypatch, flags, expected):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Some CPU", frozenset(flags)))
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.onednn_default() is expected
    assert machine.isa_features() == [f for f in machine.ISA_FEATURES if f in flags]
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    assert machine.onednn_default() is None


def test_describe_names_the_cpu_its_features_and_onednn():
    line = machine.describe()
    assert line.startswith(machine.cpu_model())
    assert f"oneDNN {'on' if machine.onednn_enabled() else 'off'}" in line
    assert all(feature in line for feature in machine.isa_features())


# machine.py loaded on its own (the package's __init__ would import TensorFlow), with the
# CPU flags of the case, then prepare_tensorflow() as `import pspnet_tf` calls it.
_PREPARE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("machine_alone", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    m._cpuinfo = lambda: ("Some CPU", frozenset(sys.argv[2].split(",")))
    m.platform.machine = lambda: "x86_64"
    m.prepare_tensorflow()
    print(json.dumps([os.environ.get("TF_ENABLE_ONEDNN_OPTS"), m.startup_notes(),
                      "tensorflow" in sys.modules]))
    """
)


@pytest.mark.parametrize(
    "flags, setting, expected",
    [
        ("avx2,fma", None, "1"),  # TF would leave it off: turned on, one line says so
        ("avx2,fma", "0", "0"),  # the user's choice stands
        ("avx2,fma,avx512f,avx512_bf16", None, None),  # TF turns it on itself
    ],
)
def test_prepare_tensorflow_turns_onednn_on_only_where_tf_leaves_it_off(flags, setting, expected):
    import json

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run(
        [sys.executable, "-c", _PREPARE, machine.__file__, flags],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    value, notes, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert value == expected
    assert not imported  # not the command line: TensorFlow is left for the caller to import
    if setting is None and expected == "1":
        assert len(notes) == 1 and "TF_ENABLE_ONEDNN_OPTS=0" in notes[0]
    else:
        assert notes == []


def test_command_line_starts_without_tensorflow_log_lines():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-m", "pspnet_tf", "--version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    from pspnet_tf import __version__

    assert out.stdout.strip() == __version__
    # Only the command's own lines (the oneDNN choice, where it was made) reach stderr.
    assert all(line.startswith("pspnet-tf: ") for line in out.stderr.splitlines()), out.stderr
