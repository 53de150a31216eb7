"""The images' lock files, `locks/operator.txt` and `locks/trainer.txt`, against pyproject.toml and constraints.txt.

Each Dockerfile installs its lock with `pip install --require-hashes` (test_images.py checks that statically),
so the lock, not pyproject.toml, is what an image gets: a dependency added to pyproject.toml without `make lock`
would be missing from it, a bound raised there would not be honoured. `make lock` writes both locks with uv;
this module checks them offline, parsed with `packaging` (no resolver, no index): every requirement of
pyproject.toml (the operator's: `[project].dependencies` and `build-system.requires`; the trainer's: those and
the `train` extra) is locked at a version that satisfies both its specifier and constraints.txt; every entry is
pinned with == and carries sha256 hashes; no entry is a direct dependency pyproject.toml no longer names, and
every transitive one is required by a locked entry; the operator lock has no training or test library; the
trainer lock has no CUDA library, and its torch matches both the CPU wheel and the release base's CUDA build.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.unit.test_images import LOCKS, ROOT, TEST_ONLY, TRAINING_LIBRARIES, pyproject

REGENERATE = "regenerate the locks with `make lock` (docs/design.md#supply-chain)"
#: What the locks are resolved for (`make lock`: --python-version 3.11 --python-platform x86_64-manylinux_2_28):
#: the images' Python; markers in pyproject.toml are evaluated for it.
TARGET = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
#: The CUDA libraries PyPI's torch depends on: the release trainer base ships them with its torch, and a CPU
#: image must not download gigabytes of them.
CUDA = re.compile(r"^(nvidia-|triton$|cuda-)")
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class Entry:
    name: str  #: normalized
    requirement: Requirement
    version: Version
    hashes: list[str]
    line: int
    #: uv's `# via` annotations: the locked packages that require it, `<project> (pyproject.toml)` for a
    #: dependency pyproject.toml names, `-c constraints.txt` for one the constraints pin; none for the lines
    #: `make lock` passes on stdin (build-system.requires).
    via: set[str] = field(default_factory=set)


def parse_lock(path: Path) -> dict[str, Entry]:
    """A pip requirements file as uv writes it: `name==version \\` then `--hash=...` lines, then `# via` comments."""
    entries: dict[str, Entry] = {}
    last: Entry | None = None
    in_via = False
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            text = line.lstrip("#").strip()
            if last is not None and text.startswith("via"):
                in_via = text == "via"
                if not in_via:
                    last.via.add(text.removeprefix("via").strip())
            elif last is not None and in_via and text:
                last.via.add(text)
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending, in_via = pending + line, "", False
        pinned, _, rest = text.partition(" --")
        options = ("--" + rest).split() if rest else []
        requirement = Requirement(pinned)
        assert all(o.startswith("--hash=") for o in options), f"{path.name}:{start}: only --hash options: {text!r}"
        (spec, *more) = list(requirement.specifier) or [None]
        assert spec is not None and not more and spec.operator == "==" and "*" not in spec.version, (
            f"{path.name}:{start}: {requirement} is not pinned to one version with ==")
        assert not requirement.url and not requirement.extras, f"{path.name}:{start}: {requirement}"
        name = canonicalize_name(requirement.name)
        assert name not in entries, f"{path.name}:{start}: {name} is locked twice"
        last = entries[name] = Entry(name, requirement, Version(spec.version),
                                     [o.removeprefix("--hash=") for o in options], start)
    assert not pending, f"{path.name}: the last line ends with a line continuation"
    return entries


def expected(image: str) -> list[Requirement]:
    """What pyproject.toml asks the image's lock to hold: its dependencies and the build backend."""
    data = pyproject()
    requirements = list(data["project"]["dependencies"]) + list(data["build-system"]["requires"])
    if image == "trainer":
        requirements += data["project"]["optional-dependencies"]["train"]
    parsed = [Requirement(r) for r in requirements]
    return [r for r in parsed if r.marker is None or r.marker.evaluate(TARGET)]


def constraints() -> dict[str, SpecifierSet]:
    pins: dict[str, SpecifierSet] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            pins[name] = pins.get(name, SpecifierSet()) & requirement.specifier
    return pins


@pytest.fixture(scope="module", params=list(LOCKS))
def image(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lock(image: str) -> dict[str, Entry]:
    path = LOCKS[image]
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: {REGENERATE}"
    return parse_lock(path)


def test_written_by_make_lock(image: str) -> None:
    header = LOCKS[image].read_text().splitlines()[:2]
    assert header == ["# This file was autogenerated by uv via the following command:", "#    make lock"], (
        f"{LOCKS[image].name} was not written by `make lock`: {REGENERATE}")


def test_every_entry_is_pinned_and_hashed(image: str, lock: dict[str, Entry]) -> None:
    assert lock, f"{LOCKS[image].name} locks nothing"
    for entry in lock.values():
        assert entry.hashes, f"{LOCKS[image].name}:{entry.line}: {entry.requirement} has no --hash: {REGENERATE}"
        bad = [h for h in entry.hashes if not SHA256.match(h)]
        assert not bad, f"{LOCKS[image].name}:{entry.line}: {entry.name}: not sha256 hashes: {bad}"


def test_every_pyproject_requirement_is_locked_within_its_specifier(image: str, lock: dict[str, Entry]) -> None:
    pins = constraints()
    for requirement in expected(image):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{LOCKS[image].name} lacks {requirement} (pyproject.toml): {REGENERATE}"
        version = lock[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCKS[image].name} locks {name}=={version}, pyproject.toml asks {requirement}: {REGENERATE}")
        assert pins.get(name, SpecifierSet()).contains(version, prereleases=True), (
            f"{LOCKS[image].name} locks {name}=={version}, constraints.txt pins {name}{pins[name]}: {REGENERATE}")


def test_every_entry_follows_the_constraints(image: str, lock: dict[str, Entry]) -> None:
    """Transitive ones too: constraints.txt pins the tested release of libraries pyproject.toml never names."""
    for name, specifier in constraints().items():
        if name in lock:
            assert specifier.contains(lock[name].version, prereleases=True), (
                f"{LOCKS[image].name} locks {name}=={lock[name].version}, constraints.txt pins {name}{specifier}: "
                f"{REGENERATE}")


def test_no_entry_is_a_dependency_nobody_asks_for(image: str, lock: dict[str, Entry]) -> None:
    """A direct entry is one pyproject.toml names; a transitive one is required by another locked entry."""
    project = f"{canonicalize_name(pyproject()['project']['name'])} (pyproject.toml)"
    named = {canonicalize_name(r.name) for r in expected(image)}
    for entry in lock.values():
        parents = entry.via - {project, "-c constraints.txt"}
        if project in entry.via or not parents:
            assert entry.name in named, (
                f"{LOCKS[image].name}:{entry.line}: {entry.name} is locked as a dependency of the project, which "
                f"pyproject.toml no longer names: {REGENERATE}")
        stale = {p for p in parents if canonicalize_name(p) not in lock}
        assert not stale, (f"{LOCKS[image].name}:{entry.line}: {entry.name} is locked for {sorted(stale)}, which the "
                           f"lock no longer has: {REGENERATE}")


def test_operator_lock_holds_no_training_or_test_library() -> None:
    """The operator never imports torch: nothing of the trainer's or the tests' may reach its image."""
    lock = parse_lock(LOCKS["operator"])
    unwanted = sorted(set(lock) & {canonicalize_name(n) for n in TRAINING_LIBRARIES | TEST_ONLY})
    assert not unwanted, f"the operator lock has {unwanted}: a dependency of the operator pulls them in"


def test_trainer_lock_torch_is_the_cpu_wheel_and_the_release_base_s() -> None:
    """torch==<constraints' version>, without a local label, and no CUDA library.

    `make lock` resolves torch to the CPU wheel (2.13.0+cpu) and writes torch==2.13.0 with that wheel's sha256:
    the CPU image's pip downloads that wheel and checks it; the release base's CUDA build (2.13.0+cu...)
    satisfies ==2.13.0 too, so pip keeps it without a download (an installed distribution has no hash to check).
    A lock with PyPI's torch would bring its CUDA libraries into the CPU image; one with its hashes too would
    make pip prefer PyPI's wheel (a link whose hash is listed sorts first) over the CPU one.
    """
    lock = parse_lock(LOCKS["trainer"])
    cuda = sorted(n for n in lock if CUDA.match(n))
    assert not cuda, f"the trainer lock has CUDA libraries {cuda}: `make lock` found no CPU torch wheel"
    torch = lock["torch"]
    assert not torch.version.local, f"torch=={torch.version}: the release base's CUDA build would not satisfy it"
    assert constraints()["torch"].contains(torch.version)
    # The CPU wheel this machine's builds use (`make images` serves PIP_FIND_LINKS to the trainer's build).
    wheels = [wheel for folder in os.environ.get("PIP_FIND_LINKS", "").split() if Path(folder).is_dir()
              for wheel in Path(folder).glob(f"torch-{torch.version}+cpu-*.whl")]
    for wheel in wheels:
        digest = hashlib.sha256()
        with open(wheel, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        assert f"sha256:{digest.hexdigest()}" in torch.hashes, f"{wheel.name} is not in the lock: {REGENERATE}"
