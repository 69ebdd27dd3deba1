"""What machine this is; importing the package changes nothing; the command starts quietly."""

import json
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


# What `import pspnet_tf` (and its public API's modules) could change in the process.
_STATE = textwrap.dedent(
    """
    import json, logging, os, random, sys
    import numpy as np
    # The dependencies first: TensorFlow draws from Python's random generator when it
    # loads and OpenCV extends LD_LIBRARY_PATH; what is measured is pspnet_tf's own doing.
    import cv2, h5py, keras, PIL.Image, tensorflow, yaml
    def state():
        return {"env": dict(os.environ), "fds": sorted(os.listdir("/proc/self/fd")),
                "root": logging.getLogger().level, "tf": logging.getLogger("tensorflow").level,
                "random": random.getstate()[1][:4], "numpy": int(np.random.get_state()[1][0])}
    before = state()
    import pspnet_tf
    from pspnet_tf import build_pspnet, evaluate, export_saved_model, predict_image, train
    after = state()
    changed = sorted(k for k in before if before[k] != after[k])
    env = sorted(set(before["env"].items()) ^ set(after["env"].items()))
    print(json.dumps({"changed": changed, "env": env}))
    """
)


def test_importing_the_package_changes_no_process_state():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "ONEDNN"))}
    out = subprocess.run(
        [sys.executable, "-c", _STATE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # TensorFlow itself opens files when it loads; none of them is fd 0-2 redirected.
    assert [k for k in result["changed"] if k != "fds"] == [], result
    assert result["env"] == [], result


def _command(*argv, env=None):
    env = env or {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pspnet_tf", *argv],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")]  # fmt: skip
    logs = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    return out.stdout, imported, logs


def test_help_and_version_load_no_tensorflow():
    from pspnet_tf import __version__

    out, imported, logs = _command("--version")
    assert out.strip() == __version__ and logs == []
    assert "tensorflow" not in imported and "keras" not in imported, imported
    out, imported, _ = _command("train", "--help")
    assert "--freeze-backbone-epochs" in out and "tensorflow" not in imported


def test_command_line_starts_without_tensorflow_log_lines():
    out, _, logs = _command(
        "summary", "--backbone", "mobilenetv2", "--alpha", "0.35", "--input-size", "32"
    )
    assert "parameters" in out  # a model was built: TensorFlow ran
    assert logs == [], logs  # TensorFlow's start-up lines silenced
