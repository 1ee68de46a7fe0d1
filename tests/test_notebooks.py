"""The Colab notebooks run top to bottom with their defaults, and are stored without outputs.

Each `colab/*.ipynb` is executed headless by nbclient in a fresh Python kernel (working folder
`colab/`, matplotlib's Agg backend, temporary files under pytest's tmp_path), and fails the
test if any cell raises. The kernel is this interpreter (`sys.executable`), through a
kernelspec written to a temporary folder, so no `ipykernel install` is needed and the
notebooks see the jpe under test. JAX in the kernel sees two CPU devices, so that the
notebooks' mesh and sharding code runs with more than one device, as on a TPU or multi-GPU
host.
"""

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

import jpe

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# Folders that never hold the project's notebooks (virtual environments, run outputs).
_SKIP_DIRS = {"runs", "build", "dist", "node_modules", "venv", "env", "site-packages"}


def _repo_notebooks() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".ipynb")]
    return sorted(found)


def _code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_colab_has_notebooks():
    assert NOTEBOOKS, f"no notebooks under {COLAB}"


@pytest.mark.parametrize("path", _repo_notebooks(), ids=_name)
def test_outputs_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{_name(path)}: code cell {i} has outputs; strip them"
        assert cell.execution_count is None, (
            f"{_name(path)}: code cell {i} has execution_count {cell.execution_count}; "
            "strip it (null)"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_first_cells_install_and_detect(path):
    """The first code cell installs jpe only when it is missing; the next shows the devices."""
    cells = _code_cells(path)
    assert len(cells) >= 2, f"{_name(path)}: fewer than two code cells"
    install, detect = cells[0], cells[1]
    for cell in (install, detect):
        ast.parse(cell)  # plain Python: no shell escapes (!pip) before jpe is importable
    assert 'find_spec("jpe") is None' in install, "the install cell must check for jpe first"
    assert "pip" in install and '"-e"' in install and "pyproject.toml" in install
    # pip runs only inside the `if find_spec("jpe") is None:` branch.
    guard = install.index('find_spec("jpe") is None')
    assert all(m.start() > guard for m in re.finditer('"pip"', install))
    assert "import jpe" in install
    assert "jax.devices()" in detect and "jax.default_backend()" in detect


def _param_lists(path: Path) -> dict[str, list]:
    """`name = value  # @param [...]` Colab dropdowns: name -> the listed options."""
    out = {}
    for source in _code_cells(path):
        for line in source.splitlines():
            code, sep, form = line.partition("# @param")
            if sep and form.strip().startswith("["):
                out[code.split("=")[0].strip()] = json.loads(form.strip())
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_pe_dropdowns_list_every_encoding(path):
    # the library's own encodings (other test files register examples of their own)
    builtin = [n for n in jpe.ENCODINGS if jpe.nn.encoding_class(n).__module__.startswith("jpe.")]
    assert "floater" in builtin and "test-gaussian" not in builtin
    for name, options in _param_lists(path).items():
        if name == "pe":
            assert options == builtin, (
                f"{_name(path)}: the pe dropdown lists {options}; jpe.ENCODINGS has {builtin}"
            )


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A `python3` kernelspec for this interpreter, found first on JUPYTER_PATH."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter_path / "kernels" / "python3")
    return {
        "JUPYTER_PATH": os.pathsep.join(
            [str(jupyter_path), *filter(None, [os.environ.get("JUPYTER_PATH")])]
        ),
        "MPLBACKEND": "Agg",
        # Optimized and with XLA's default emitters, as users run them (the suite's own programs
        # compile without: conftest.py); the notebooks train for long enough that -O0 programs
        # make them slower overall, and the classic emitters did too (notebook 03: 95 s, not 71).
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "0",
        "XLA_FLAGS": " ".join(
            [
                os.environ.get("JPE_TEST_USER_XLA_FLAGS", ""),
                "--xla_force_host_platform_device_count=2",
            ]
        ).strip(),
    }


def test_kernel_is_this_python(kernel_env, monkeypatch):
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    assert argv[0] == sys.executable, argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_runs(path, kernel_env, monkeypatch, tmp_path):
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary workdirs
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(COLAB)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"{_name(path)}: {time.perf_counter() - start:.1f} s")
