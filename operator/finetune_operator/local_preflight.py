"""`finetune plan --inspect`'s data count: the operator's CPU pre-flight, run on this machine.

Where the trainer package is installed and every dataset URI of a spec (spec.dataset.train,
spec.dataset.validation, spec.evaluation.testSet, spec.evaluation.preferenceTestSet) is on this machine (`file://`, or `pvc://claim/path`
under the claim's `--mount CLAIM=PATH`), `count` runs the pre-flight's own model and data checks
(`finetune_trainer.preflight.check_local`: the tokenizer from the inspected model directory, every row read
by the trainer's readers, tokens counted as the trainer encodes examples) and completes the plan from the
result with `preflight.complete_plan`, the operator's own function: `method: auto` decided on the counted
examples and `plan.estimate` (steps, hours, GPU-hours). So the printed plan is the plan the operator writes
after its pre-flight. Preference data (objective dpo) is counted in pairs, with the mean tokens per pair and
the length bias (mean chosen minus rejected tokens), which `finetune plan` prints per split. A bad row is a DataInvalid issue on its field naming the file and line; an estimate
above spec.budget.maxGpuHours is an issue on that field with `preflight.over_budget`'s message.

`s3://` and `hf://` data are not downloaded by `finetune plan`: the plan then stays the model-only one and
`count` says why in a note, as it does when the trainer (or its dependencies) is missing or the model
directory has no tokenizer. The trainer is imported only here, and only when used: `finetune plan` runs
without torch or transformers.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune_operator import contract, preflight, serving, sizing, uris
from finetune_operator.manifests import Issue, Loaded
from finetune_operator.spec import FineTuneJobSpec

TRAINER = "finetune_trainer"


@dataclass(frozen=True)
class Mounts:
    """Where `pvc://` claims are mounted on this machine (`--mount CLAIM=PATH`, repeatable)."""

    claims: Mapping[str, str]

    @classmethod
    def parse(cls, items: Sequence[str]) -> Mounts:
        """Raises ValueError naming an item that is not CLAIM=PATH."""
        claims: dict[str, str] = {}
        for item in items:
            claim, sep, path = item.partition("=")
            if not sep or not claim or not path:
                raise ValueError(f"--mount {item!r}: expected CLAIM=PATH, the local path where the claim is mounted")
            claims[claim] = path
        return cls(claims)

    def local(self, uri: str) -> str | None:
        """The path of `uri` on this machine, or None: `file://` where it points, `pvc://` under its claim's
        mount, a plain path as it is; `s3://`, `hf://` and unmounted claims are not here."""
        if "://" not in uri:
            return uri
        parsed = uris.parse(uri)
        if parsed.scheme == "file":
            return parsed.path
        if parsed.scheme == "pvc" and parsed.authority in self.claims:
            return f"{self.claims[parsed.authority].rstrip('/')}/{parsed.path}"
        return None


def data_uris(spec: FineTuneJobSpec) -> list[str]:
    """The dataset URIs the pre-flight reads, in its order."""
    found = [spec.dataset.train, spec.dataset.validation, spec.evaluation.test_set,
             spec.evaluation.preference_test_set]
    return [uri for uri in found if uri]


def trainer_missing() -> str | None:
    """Why the data cannot be counted on this machine at all (no trainer package), or None."""
    if importlib.util.find_spec(TRAINER) is None:
        return (f"the data was not counted: the trainer package ({TRAINER}) is not installed (pip install "
                "'finetune-operator[train]' -c constraints.txt); planned from the model alone")
    return None


def _not_here(uri: str) -> str:
    parsed = uris.parse(uri)
    if parsed.scheme == "pvc":
        return f"{uri} (claim {parsed.authority!r} not mounted here: --mount {parsed.authority}=PATH)"
    return uri


def count(item: Loaded, mounts: Mounts) -> str | None:
    """Count `item`'s data with the pre-flight's checks and complete its plan (see the module docstring).

    `item` must be a valid, inspected manifest. On success its plan is the completed one and `preflight`
    holds the result; a data error or a budget refusal is added to its issues. Returns a note when the
    data was not counted (the plan stays the model-only one), else None."""
    assert item.job is not None and item.plan is not None and item.architecture is not None
    job = item.job
    local: dict[str, str] = {}
    remote: list[str] = []
    for uri in data_uris(job.spec):
        path = mounts.local(uri)
        if path is None:
            remote.append(_not_here(uri))
        else:
            local[uri] = path
    if remote:
        return (f"the data was not counted: {', '.join(remote)} is not read by `finetune plan` (only file:// and "
                "pvc:// with --mount are); planned from the model alone")
    try:
        from finetune_trainer.preflight import PreflightFailure, check_local
    except ImportError as err:
        return f"the data was not counted: the trainer cannot be imported ({err}); planned from the model alone"
    # The operator's own snapshot for its pre-flight Job: the checks read only the spec.
    config = contract.resolve(job, preflight.placeholder_plan(job.spec), stage="preflight")
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-plan-") as cache:
            result = check_local(config, Path(item.architecture.path), Path(cache), local)
    except ImportError as err:  # the trainer without transformers
        return (f"the data was not counted: the trainer's dependencies are missing ({err}); planned from the "
                "model alone")
    except PreflightFailure as err:
        if err.reason != "DataInvalid":
            # --inspect reads only config.json and the safetensors headers; a directory without the tokenizer
            # files is still a model it plans from (the operator's pre-flight would refuse it).
            return f"the data was not counted: {err.message}; planned from the model alone"
        item.issues.append(Issue(err.field, err.message))
        return None
    _complete(item, result)
    return None


def _complete(item: Loaded, result: contract.PreflightResult) -> None:
    """The plan from the pre-flight's result, as the operator completes it, and its budget check."""
    assert item.job is not None
    spec = item.job.spec
    item.preflight = result
    try:
        item.plan = serving.attach(item.job, preflight.complete_plan(spec, result))
    except sizing.PlanningError as err:
        item.issues.append(Issue(err.field, err.message))
        return
    refusal = preflight.over_budget(spec.budget.max_gpu_hours if spec.budget else None, item.plan)
    if refusal is not None:
        item.issues.append(Issue("spec.budget.maxGpuHours", refusal))
