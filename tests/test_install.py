"""The install: supported interpreters only (Makefile), the numpy aliases MXNet needs on Python 3.12
(symbols/mxnet_compat.py, imported before any `import mxnet` of ours), the project on the venv's sys.path."""
import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from symbols import mxnet_compat

ROOT = Path(__file__).resolve().parents[1]


def test_the_removed_aliases_are_restored_as_the_builtins_and_present_ones_are_left_alone():
    numpy_126 = types.ModuleType("numpy")  # numpy 1.24+: the aliases are gone
    numpy_126.bool = "numpy 2 has its own np.bool again"
    assert mxnet_compat.restore_numpy_aliases(numpy_126) == ["complex", "float", "int", "object", "str"]
    assert (numpy_126.int, numpy_126.float, numpy_126.object, numpy_126.str) == (int, float, object, str)
    assert numpy_126.bool == "numpy 2 has its own np.bool again"
    assert mxnet_compat.restore_numpy_aliases(numpy_126) == []


def _imports_mxnet(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n.split(".")[0] == "mxnet" for n in names):
            return True
    return False


def test_every_module_that_imports_mxnet_gets_the_aliases_first():
    """Each package holding a module that imports mxnet imports the compat module in its __init__ (which Python
    runs before any of its modules); the tests get it from conftest.py, stock scripts through a wrapper."""
    packages = {p.relative_to(ROOT).parts[0] for p in ROOT.glob("*/**/*.py")
                if p.relative_to(ROOT).parts[0] not in ("tests", "demo")
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)  # .venv*, .cache
                and _imports_mxnet(p)}
    assert {"symbols", "train", "tools", "bench"} <= packages and "recbuild" not in packages
    for package in sorted(packages | {"tests/conftest.py"}):
        init = ROOT / package if package.endswith(".py") else ROOT / package / "__init__.py"
        before = []  # the top-level imports up to the compat module's
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                before += [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [f"{node.module}.{a.name}" for a in node.names]
                if "symbols.mxnet_compat" in before:
                    break
        assert "symbols.mxnet_compat" in before, f"{init}: does not import symbols.mxnet_compat"
        early = [n for n in before[:-1] if n.split(".")[0] in ("mxnet", "symbols", "train", "tools", "bench")]
        assert not early, f"{init}: {early} imported before symbols.mxnet_compat"


def _make_install(tmp_path, python):
    return subprocess.run(["make", "-s", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={python}"], capture_output=True, text=True, timeout=60)


def test_an_unsupported_python_stops_the_install_with_one_line(tmp_path):
    fake = tmp_path / "python3.13"  # this Python claiming to be 3.13.0 to the code it is given with -c
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import sys, platform; sys.version_info = (3, 13, 0); '
                    f'platform.python_version = lambda: \'3.13.0\'; exec(sys.argv[1])" "$2"\n')
    fake.chmod(0o755)
    done = _make_install(tmp_path, fake)
    assert done.returncode == 2 and not (tmp_path / "venv").exists()
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"PYTHON={fake} is Python 3.13.0; mxtransfer supports Python 3.8 to 3.12: " \
           "make install PYTHON=python3.12" in done.stderr
    missing = _make_install(tmp_path, tmp_path / "python9")
    assert missing.returncode == 2 and "python9 is not found; mxtransfer supports Python 3.8 to 3.12" in missing.stderr


def test_a_supported_python_passes_the_check(tmp_path):
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert f"{sys.executable} -m venv {tmp_path / 'venv'}" in plan.stdout


@pytest.mark.slow
def test_the_commands_run_from_any_folder_even_one_with_a_train_image_folder(tmp_path):
    """`make install-in-place` puts the repository on a venv's sys.path; from a Kaggle folder (train/ and test/
    image folders, no __init__.py) `python -m train` is still ours, not the images as a namespace package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this venv's mxnet, numpy, ... without a pip run (addsitedir: their own .pth files too, e.g. setuptools')
    Path(purelib, "dependencies.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run(["make", "-s", "-C", str(ROOT), "install-in-place", f"VENV={venv}"], check=True, timeout=60)
    kaggle = tmp_path / "kaggle"
    for folder in ("train", "test"):
        (kaggle / folder).mkdir(parents=True)
        (kaggle / folder / "0001.jpg").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for module in ("train", "recbuild", "tools.caffe_converter"):  # one per package a user runs
        done = subprocess.run([str(python), "-m", module, "--help"], cwd=kaggle, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m {module} "), (module, done.stderr)
    where = subprocess.run([str(python), "-c", "import train, tools; print(train.__file__, tools.__file__)"],
                           cwd=kaggle, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(ROOT / "train" / "__init__.py"), str(ROOT / "tools" / "__init__.py")]
