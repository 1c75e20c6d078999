"""The wheel users install: built with maturin against the stable ABI (abi3, CPython 3.10+),
installed by pip into a fresh virtualenv, imported from there (not from this checkout), a miss
and a hit run with it, ``python -m chengeta_ai --version``.

The wheel is built in the dev profile (``maturin build``, no ``--release``): it reuses the
compiled crate of ``make build``, so the test costs a link, not a release build; the artifact is
the same kind of wheel ``make wheel`` builds, with the same tags. The fresh virtualenv has no
pip of its own (this venv's pip installs into it) and reaches the runtime dependencies (anyio,
sniffio, orjson) through a ``.pth`` line naming this venv's site-packages, so no network is
needed; a plain path in a ``.pth`` does not run that directory's own ``.pth`` files, so the
editable install of this checkout stays out of it.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import chengeta_ai

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    maturin = Path(sys.executable).with_name("maturin")
    if not maturin.exists():
        found = shutil.which("maturin")
        assert found, "maturin is part of the dev install (make install)"
        maturin = Path(found)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [str(maturin), "build", "--out", str(out), "--interpreter", sys.executable, "--quiet"],
        cwd=ROOT,
        check=True,
        timeout=1200,
    )
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_in(python: Path, tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_wheel_is_abi3_for_cpython_3_10_and_later(wheel: Path) -> None:
    name = wheel.name
    assert name.startswith(f"chengeta_ai-{chengeta_ai.__version__}-cp310-abi3-"), name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (extension,) = [n for n in names if n.endswith(".so")]
        assert extension == "chengeta_ai/_core.abi3.so"
        assert "chengeta_ai/py.typed" in names and "chengeta_ai/_core.pyi" in names
        (meta_path,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_path))
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Version"] == chengeta_ai.__version__


def test_the_installed_wheel_caches_a_stream(fresh_python: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from importlib.metadata import version

        import chengeta_ai
        from chengeta_ai import CacheManager, StreamingResponseCache, _core

        # imported from the fresh venv, never from the checkout
        assert chengeta_ai.__file__.startswith(sys.prefix), chengeta_ai.__file__
        assert _core.__file__.endswith("_core.abi3.so"), _core.__file__
        assert version("chengeta_ai") == chengeta_ai.__version__

        cache = StreamingResponseCache(CacheManager())
        calls = []

        def stream_fn(messages):
            calls.append(1)
            return [{"delta": "Hel"}, {"delta": "lo"}]

        for _ in range(2):
            got = list(cache.get_or_stream([{"role": "user", "content": "hi"}], stream_fn))
            assert got == [{"delta": "Hel"}, {"delta": "lo"}], got
        stats = cache.stats()
        assert (stats["misses"], stats["hits"], len(calls)) == (1, 1, 1), stats
        print("ok")
        """
    )
    assert run_in(fresh_python, tmp_path, "-c", script).strip() == "ok"


def test_python_m_chengeta_ai_version(fresh_python: Path, tmp_path: Path) -> None:
    out = run_in(fresh_python, tmp_path, "-m", "chengeta_ai", "--version")
    assert out.strip() == f"chengeta_ai {chengeta_ai.__version__}"
