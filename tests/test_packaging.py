"""The package as a user installs it: `python -m build` makes a wheel and an sdist; the wheel, installed into a clean
virtual environment (torch first, then the wheel and what it declares), runs `mixtral-offload generate` on the
embedded demo model; the sdist holds the tests and scripts. Needs the package index (CI has it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="pip install build")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_wheel_and_sdist_hold_what_they_must(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("mixtral_offload_plugin/py.typed", "mixtral_offload_plugin/kernels/native.c",
                   "mixtral_offload_plugin/kernels/native_int4.h", "mixtral_offload_plugin/runtime/decode.c",
                   "mixtral_offload_plugin/models/demo_model/model.safetensors",
                   "mixtral_offload_plugin/models/demo_model/tokenizer.json",
                   "webui_extension/mixtral_offload/script.py", "langchain_integration/chat_models.py"):
        assert needed in names, needed
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text and "Classifier: Typing :: Typed" in text
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"tests/conftest.py", "tests/runtime/test_session.py", "scripts/setup.sh", "LICENSE"} <= members


def test_the_wheel_installs_into_a_clean_venv_and_generates(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the CPU build (scripts/setup.sh does the same)
    for args in ([torch_spec], [str(wheel)]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
    run = subprocess.run([str(venv / "bin" / "mixtral-offload"), "generate", "Once upon a time", "--max-new-tokens",
                          "8", "--seed", "0", "--device", "cpu"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, "MIXTRAL_OFFLOAD_PLUGINS": "", "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("Once upon a time") and "tok/s" in run.stderr
    assert "of 8 experts/layer cached" in run.stderr  # the demo model, offloaded, from the installed wheel
    version = subprocess.run([str(venv / "bin" / "mixtral-offload"), "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("mixtral-offload 0.")
