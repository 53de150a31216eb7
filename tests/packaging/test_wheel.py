"""The project's wheel, built and installed into a fresh virtual environment: is everything in it?

The development environment installs the project editable (`make install`: `uv pip install -e`), which maps
the source directories onto `sys.path`: every module in the tree imports there, listed in pyproject's
`[tool.setuptools] packages` or not. The wheel holds only the packages that list names (explicitly, there is
no discovery: see the comment there), and both images install the wheel (`pip install .` in each Dockerfile),
as do `pip install finetune-operator` users. A subpackage missing from that list once broke every image while
the whole test suite passed. So here, the way a release is built:

- the sdist and then the wheel from it are built (`uv build`) from a copy of the checkout, so no build output
  (`build/`, `*.egg-info`) lands in the working tree;
- a fresh virtual environment (no system site packages) gets the wheel with the `train` extra, through
  constraints.txt and the local wheels folder as every install in this project (`$PIP_FIND_LINKS`);
- its python, started outside the repository with PYTHONPATH unset (and `-I`), walks the installed
  `finetune_operator` and `finetune_trainer` with pkgutil.walk_packages and imports every module. The list
  must equal the modules of the source tree (every `*.py` under both package directories except the package
  data under finetune_trainer/data/), and each module's `__file__` must lie in the fresh environment;
- the wheel holds the package data the code reads (finetune_trainer/data/*, found by tiny.DATA_DIR) and
  finetune_operator/py.typed;
- the `finetune` console script runs.

Marked slow: it installs torch and the rest of the `train` extra. After `make install` that is seconds (uv
links the files from its cache); with an empty uv cache, a download of the whole `train` extra.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: Each top-level package and its directory in the source tree (pyproject's `package-dir`).
PACKAGE_DIRS = {
    "finetune_operator": ROOT / "operator" / "finetune_operator",
    "finetune_trainer": ROOT / "trainer-image" / "finetune_trainer",
}
#: Package data, not modules: the bundled sample (and the script that writes it, `data/make_sample.py`).
DATA_DIR = PACKAGE_DIRS["finetune_trainer"] / "data"
#: What the copy of the checkout leaves out: version control, environments, build outputs, caches (as
#: .gitignore). The build needs only pyproject.toml, README.md and the two package directories.
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".mypy_cache", ".ruff_cache", ".demo", "out")
FIX = "add it to [tool.setuptools] packages in pyproject.toml"

#: Run by the fresh environment's python: walks both installed packages, imports every module it finds and
#: every module the source tree has (argv[1], JSON), and prints what it found as JSON.
IMPORT_ALL = r"""
import importlib, importlib.util, json, os, pkgutil, sys, traceback
from pathlib import Path

expected = json.loads(sys.argv[1])
walked, files, errors = [], {}, {}
IMPORTLIB = os.path.dirname(importlib.__file__)

# The exception being handled and the innermost line of the project or a library that raised it (importlib's
# frames and this script's are not worth reading).
def error():
    kind, value, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith("<") and os.path.dirname(f.filename) != IMPORTLIB]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}\n" if frames else ""
    return where + "".join(traceback.format_exception_only(kind, value)).strip()

def on_error(name):  # a subpackage that failed to import while walk_packages imported it to look inside
    errors[name] = error()

for top in ("finetune_operator", "finetune_trainer"):
    try:
        package = importlib.import_module(top)
    except Exception:
        errors[top] = error()
        continue
    walked.append(top)
    walked.extend(m.name for m in pkgutil.walk_packages(package.__path__, top + ".", onerror=on_error))

for name in sorted((set(walked) | set(expected)) - set(errors)):
    try:
        if name.rsplit(".", 1)[-1] == "__main__":
            # `python -m` entry points exit when imported: find it without running it.
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            files[name] = spec.origin
        else:
            files[name] = importlib.import_module(name).__file__
    except BaseException:
        errors[name] = error()

# Where the code reads the bundled sample (tiny.DATA_DIR): the installed package's data/ folder.
data = Path(sys.modules["finetune_trainer"].__file__).parent / "data" if "finetune_trainer" in files else None
print(json.dumps({
    "prefix": sys.prefix,
    "sys_path": sys.path,
    "walked": walked,
    "files": files,
    "errors": errors,
    "data_dir": str(data),
    "data_files": sorted(p.name for p in data.iterdir() if p.is_file()) if data and data.is_dir() else [],
}))
"""


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # outside the repository: the working directory of everything run in the venv

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def clean_env() -> dict[str, str]:
    """This environment without what would put the source tree (or another environment) on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


def run(cmd: list[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def uv() -> str:
    """The uv of this environment (`make install` puts it there), else one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        pytest.fail("uv not found beside the running python or on PATH: run `make install`")
    return found


def source_modules() -> set[str]:
    """Every module the source tree has: each `*.py` of both packages, package data left out."""
    names: set[str] = set()
    for top, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            if path.is_relative_to(DATA_DIR) or "__pycache__" in path.parts:
                continue
            parts = [top, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join(parts))
    return names


def package_of(module: str) -> str:
    """The package that has to be listed in pyproject for `module` to be in the wheel."""
    top = module.split(".", 1)[0]
    directory = PACKAGE_DIRS[top].joinpath(*module.split(".")[1:])
    return module if directory.is_dir() else module.rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    # Outside the repository, or the source tree would be the working directory of what runs in the venv.
    assert not base.resolve().is_relative_to(ROOT), f"{base} is in the repository: pass another --basetemp"
    src, dist, venv, workdir = base / "src", base / "dist", base / "venv", base / "work"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE, symlinks=True)
    workdir.mkdir()

    # sdist, then the wheel from the sdist: what a release builds, and what `pip install <sdist>` builds.
    run([uv(), "build", "-q", "--out-dir", dist, src], cwd=workdir)
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"

    # A fresh environment from the base interpreter: nothing of .venv (where the editable install lives).
    run([uv(), "venv", "-q", "--python", sys.executable, venv], cwd=workdir)
    find_links = os.environ.get("PIP_FIND_LINKS")
    run([uv(), "pip", "install", "-q", "--python", venv / "bin" / "python", "-c", ROOT / "constraints.txt",
         *(["--find-links", find_links] if find_links else []), f"{wheels[0]}[train]"], cwd=workdir)
    return Installed(wheel=wheels[0], venv=venv, workdir=workdir)


@pytest.fixture(scope="module")
def imported(installed: Installed) -> dict[str, Any]:
    expected = sorted(source_modules())
    proc = run([installed.python, "-I", "-c", IMPORT_ALL, json.dumps(expected)], cwd=installed.workdir)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_source_tree_has_both_packages() -> None:
    # Guards the comparison below against a moved package directory (an empty list would compare equal).
    assert {"finetune_operator", "finetune_operator.cli", "finetune_trainer", "finetune_trainer.methods",
            "finetune_trainer.__main__"} <= source_modules()


def test_the_fresh_environment_does_not_see_the_source_tree(installed: Installed,
                                                            imported: dict[str, Any]) -> None:
    assert Path(imported["prefix"]).resolve() == installed.venv.resolve()
    inside = [p for p in imported["sys_path"] if p and Path(p).resolve().is_relative_to(ROOT)]
    assert not inside, f"sys.path of the fresh environment reaches into the repository: {inside}"


def test_every_source_module_is_in_the_wheel(imported: dict[str, Any]) -> None:
    expected, walked = source_modules(), set(imported["walked"])
    missing = sorted(expected - walked)
    packages = sorted({package_of(m) for m in missing})
    assert not missing, (
        f"in the source tree but not in the installed wheel: {', '.join(missing)}.\n"
        f"Package(s) not in the wheel: {', '.join(packages)}: {FIX} "
        "(a subpackage also needs an __init__.py). Editable installs hide this; every image misses them.")
    extra = sorted(walked - expected)
    assert not extra, f"in the wheel but not in the source tree (a stale build?): {', '.join(extra)}"


def test_every_module_imports_from_the_fresh_environment(installed: Installed,
                                                         imported: dict[str, Any]) -> None:
    errors: dict[str, str] = imported["errors"]
    details = "\n".join(f"--- {name}\n{error}" for name, error in sorted(errors.items()))
    assert not errors, ("modules that do not import from the installed wheel (with the `train` extra); a "
                        f"package missing from the wheel? {FIX}\n{details}")
    venv = installed.venv.resolve()
    outside = {name: file for name, file in imported["files"].items()
               if not file or not Path(file).resolve().is_relative_to(venv)}
    assert not outside, f"modules not loaded from the fresh environment {venv}: {outside}"
    assert source_modules() <= set(imported["files"])


def test_the_wheel_holds_the_package_data(installed: Installed, imported: dict[str, Any]) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    data = sorted(p.name for p in DATA_DIR.iterdir() if p.is_file() and p.suffix != ".pyc")
    assert "healthcare_train.jsonl" in data, f"the bundled sample moved? {DATA_DIR} has {data}"
    wanted = ["finetune_operator/py.typed", *(f"finetune_trainer/data/{name}" for name in data)]
    missing = [name for name in wanted if name not in names]
    assert not missing, (f"{installed.wheel.name} lacks package data: {missing}; "
                         "list it in [tool.setuptools.package-data] in pyproject.toml")
    # Where the code reads it (tiny.DATA_DIR: the package's data/ folder), in the fresh environment.
    where = Path(imported["data_dir"]).resolve()
    assert where.is_relative_to(installed.venv.resolve()), f"the package data is read from {where}"
    assert set(data) <= set(imported["data_files"]), f"{where} holds only {imported['data_files']}"


def test_the_console_script_runs(installed: Installed) -> None:
    script = installed.venv / "bin" / "finetune"
    assert script.exists(), "no `finetune` console script: see [project.scripts] in pyproject.toml"
    proc = run([script, "--help"], cwd=installed.workdir, timeout=120)
    assert "usage: finetune" in proc.stdout
