"""TensorFlow defaults that importing medseg sets (each check in a fresh process, since
TensorFlow reads them once, when it is imported)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_python(code: str, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    environment.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not X86, reason="oneDNN is turned on on x86-64 only")
def test_tensorflow_imported_after_medseg_runs_onednn_kernels():
    code = (
        "import os, medseg, tensorflow\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], port.IsMklEnabled())"
    )
    assert run_python(code) == "1 True"


def test_a_users_own_onednn_setting_is_kept():
    code = "import os, medseg; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    assert run_python(code, TF_ENABLE_ONEDNN_OPTS="0") == "0"


def test_importing_medseg_does_not_import_tensorflow():
    code = "import sys, medseg; print('tensorflow' in sys.modules)"
    assert run_python(code) == "False"
