"""The wheel installs into a fresh virtualenv and `specdec.kernels` imports from it."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    (wheel,) = (tmp_path / "dist").glob("specdec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "specdec/kernels/__init__.py" in names
    assert "specdec/decode/rowmm.c" in names  # the CPU kernel's source, compiled on first use
    assert "specdec/decode/fused.c" in names
    assert not [n for n in names if n.startswith("kernels/")], "kernels must not be top-level"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    # Dependencies (torch, transformers, ...) come from this environment's site-packages; a
    # plain path entry does not run its .pth files, so the editable specdec is not visible.
    site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run(
        [py, "-c", "import specdec, specdec.kernels, specdec.models, specdec.data; "
                   "print(specdec.__file__); print(specdec.kernels.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert all(str(env_dir) in p for p in out), out
