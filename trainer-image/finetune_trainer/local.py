"""`finetune run FILE... --local`: run FineTuneJob manifests on this machine with the pods' code.

The manifest is validated and planned exactly as the operator does (`manifests.validate_document`,
`contract.resolve`), written as the trainer config, and run through the same launcher a pod runs
(`python -m finetune_trainer.launch`) with `--processes N` local processes (gloo on CPU). The progress bar
is drawn from the trainer's progress report (`<output>/status/report.json`), the same object the operator
reads; the trainer's own log goes to a file (its tail is printed when the run fails).

Several manifests run in order, as a chain: a manifest whose `spec.baseModel.fromJob` names the metadata.name of an
earlier manifest starts from that run's result, resolved exactly as the operator resolves it on a cluster
(`finetune_operator.chain.resolve` on the earlier run's outcome: its artifacts, plan and own chain; then
`chain.apply`), and the trainer merges the earlier adapters into its base before training (`modeling.materialize_start`).
A fromJob naming no earlier manifest is refused before anything runs; a stage that fails (or misses its gates) stops
the chain, naming the stage. At the end of a chain a table shows each stage's preference accuracy, reward margin and
hallucination, base model beside result.

Flags:
  --local               run here (required for now: cluster runs go through `kubectl apply`)
  --processes N         trainer processes on this machine (default 1)
  --output URI_OR_DIR   write output there instead of spec.output.uri (a plain directory is allowed); with
                        several manifests each stage writes under <output>/<metadata.name>/
  --set PATH=VALUE      override a spec field, e.g. hyperparameters.learningRate=0.002 (repeatable;
                        VALUE is YAML; PATH is relative to spec unless it starts with metadata. or spec.);
                        with several manifests it applies to each
  --demo                self-contained demo: a local S3 server, the bundled healthcare sample (instruction
                        rows, or preference pairs for preference data) at the manifests' dataset URIs, and a
                        tiny Llama standing in for the base model
  --keep-s3             (demo) keep the S3 server running at the end until Ctrl+C
  --log FILE            trainer log file (default: a file in the work directory)

With `spec.pilot` it runs both stages as the operator does: first the LoRA pilot (`finetune_operator.pilot`:
bounded, writing under `<output>/pilot/`, gated by pilot.gates), then, only when the pilot passed, the main
run. A pilot that misses its gates stops there with exit code 4 and its scores; its adapter stays in
`<output>/pilot/model/`.

At the end it prints where the model card and its charts (loss.png, evaluation.png) are: in the output when
that is a directory, else copies under the work directory, which outlive the demo's S3 server.

Exit code: the trainer's (0 ok, 3 bad config/data/credentials, 4 gates missed, 143 stopped, 1 crash);
2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_operator import pilot as pilot_stage
from finetune_operator.contract import (
    ENV_ALLOWED_ROOTS,
    ENV_CACHE_DIR,
    ENV_CONFIG,
    ENV_MAIN_PORT,
    ENV_NUM_MACHINES,
    ENV_OUTPUT_URI,
    ENV_PROCS_PER_MACHINE,
    EXIT_CONFIG_ERROR,
    EXIT_GATES_FAILED,
    EXIT_PREEMPTED,
    TrainerConfig,
    config_json,
    resolve,
)

#: What a randomly initialized tiny stand-in needs to learn the sample in about a minute on two CPU cores,
#: with the reason printed beside each. Everything else comes from the manifest.
DEMO_OVERRIDES: list[tuple[str, Any, str]] = [
    ("hyperparameters.learningRate", 5e-3, "a random tiny model needs far larger steps than a pretrained 7B"),
    ("hyperparameters.epochs", 6, "398 examples; more passes instead of a bigger model"),
    ("hyperparameters.batchSize", 8, "more optimizer steps on a small data set"),
    ("hyperparameters.gradientAccumulationSteps", 1, "more optimizer steps on a small data set"),
    ("lora.r", 64, "the full width of the tiny model (hidden size 64)"),
    ("lora.targetModules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
     "its random frozen output head caps the logits near +-1.3, so the head gets an adapter too"),
    ("pilot.learningRate", 5e-3, "the LoRA pilot of a random tiny model needs larger steps too"),
]
DEMO_MODEL_BUCKET = "finetune-demo-models"
DEMO_MODEL_PREFIX = "tiny-llama/"


#: The DPO stage of a chain (`make demo-dpo`) on the tiny stand-in: its own steps (over the SFT stage's
#: DEMO_OVERRIDES, which it shares for the adapter's shape). Tuned on this machine; the figures are in the README.
DEMO_DPO_OVERRIDES: list[tuple[str, Any, str]] = [
    ("hyperparameters.learningRate", 2e-3, "DPO on the tiny model: larger than for a 7B, smaller than its SFT"),
    ("hyperparameters.epochs", 3, "199 pairs, two sequences each and the reference's pass: fewer passes than SFT"),
    ("dpo.beta", 0.5, "keeps the tiny policy nearer its SFT start: at 0.1 its answers degrade faster for the same gain"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune run", description="Run FineTuneJob manifests on this machine.")
    parser.add_argument("files", nargs="+", metavar="file",
                        help="FineTuneJob manifest (YAML); several run in order as a chain (spec.baseModel.fromJob)")
    parser.add_argument("--local", action="store_true", help="run on this machine (required for now)")
    parser.add_argument("--processes", type=int, default=1, help="trainer processes (default 1)")
    parser.add_argument("--output", help="output URI or directory instead of spec.output.uri (several manifests: "
                        "<output>/<name>/ each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a spec field (repeatable; every manifest), e.g. hyperparameters.learningRate=0.002")
    parser.add_argument("--demo", action="store_true",
                        help="local S3 server + bundled sample + tiny stand-in model (see `make demo`)")
    parser.add_argument("--keep-s3", action="store_true", help="(demo) keep the S3 server until Ctrl+C")
    parser.add_argument("--log", help="trainer log file")
    return parser


# ------------------------------------------------------------------------------------------------
# Manifest handling (pure)
# ------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad command line or unreadable file: exit 2."""


class ManifestError(UsageError):
    """The manifest (with --set) is not a valid FineTuneJob: exit 3, as the trainer for a bad config."""


def full_path(path: str) -> list[str]:
    """`hyperparameters.epochs` -> [spec, hyperparameters, epochs]; spec./metadata. paths stay."""
    parts = path.split(".")
    return parts if parts[0] in ("spec", "metadata") else ["spec", *parts]


def set_path(doc: dict[str, Any], path: str, value: Any) -> str:
    """Set `path` (dotted, camelCase, relative to spec unless it starts with spec./metadata.) in `doc`."""
    parts = full_path(path)
    if any(not p for p in parts):
        raise UsageError(f"--set {path!r}: empty path segment")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UsageError(f"--set {path!r}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def parse_override(text: str) -> tuple[str, Any]:
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise UsageError(f"--set {text!r}: expected PATH=VALUE, e.g. hyperparameters.learningRate=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path.strip(), value


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML: {err}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise UsageError(f"{path}: expected exactly one FineTuneJob document, found {len(docs)}")
    return docs[0]


# ------------------------------------------------------------------------------------------------
# Demo setup
# ------------------------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (boto3 reads S3 settings from the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_preference(spec: dict[str, Any]) -> bool:
    return spec.get("objective") == "dpo" or (spec.get("dataset") or {}).get("format") == "preference"


def demo_uploads(spec: dict[str, Any]) -> list[tuple[str, Path]]:
    """(S3 URI, bundled file) for each data URI of a manifest's spec: the instruction sample, or its preference
    pairs (`data/make_preference.py`) for dpo or preference data. A prefix (ending in /) gets the file under
    its own name."""
    from finetune_trainer import tiny

    data = tiny.DATA_DIR
    pairs = _is_preference(spec)
    dataset = spec.get("dataset") or {}
    evaluation = spec.get("evaluation") or {}
    out = []
    for uri, local in ((dataset.get("train"),
                        data / ("healthcare_preference_train.jsonl" if pairs else "healthcare_train.jsonl")),
                       (dataset.get("validation"),
                        data / ("healthcare_preference_test.jsonl" if pairs else "healthcare_test.jsonl")),
                       (evaluation.get("testSet"), data / "healthcare_test.jsonl"),
                       (evaluation.get("preferenceTestSet"), data / "healthcare_preference_test.jsonl"),
                       (evaluation.get("glossary"), data / "healthcare_glossary.txt"),
                       ((spec.get("retrieval") or {}).get("corpus"), data / "healthcare_corpus.jsonl")):
        if isinstance(uri, str) and uri.startswith("s3://"):
            out.append((uri + local.name if uri.endswith("/") else uri, local))
    return out


@contextlib.contextmanager
def demo_environment(docs: list[dict[str, Any]], work: Path, keep: bool) -> Iterator[tuple[dict[str, str], Any]]:
    """Start the local S3 server, upload the sample and the tiny model for every manifest (a chain shares one
    server); yields (env, server). Each manifest with a baseModel.uri gets the tiny model there; a chained one
    (fromJob) starts from its base job's result, so a size its manifest gives for a cluster is dropped."""
    from finetune_trainer import storage, tiny
    from finetune_trainer.s3server import LocalS3

    server = LocalS3(work / "s3")
    server.start()
    try:
        env = server.env()
        client = server.client()
        uploads: dict[str, Path] = {}
        buckets = {DEMO_MODEL_BUCKET}
        for doc in docs:
            spec = doc.get("spec", {})
            for uri, local in demo_uploads(spec):
                if uploads.setdefault(uri, local) != local:
                    raise UsageError(f"--demo: two manifests use {uri} for different data ({uploads[uri].name} and "
                                     f"{local.name}); give each its own URI")
            output = spec.get("output", {}).get("uri")
            if isinstance(output, str) and output.startswith("s3://"):
                buckets.add(_split_s3(output)[0])
        buckets |= {_split_s3(uri)[0] for uri in uploads}
        for bucket in sorted(buckets):
            server.create_bucket(bucket)
        for uri, local in uploads.items():
            bucket, key = _split_s3(uri)
            client.upload_file(str(local), bucket, key)
            print(f"  uploaded {local.name:<26} -> {uri}")

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = tiny.build_tiny_model(work / "tiny-model")
        model_uri = f"s3://{DEMO_MODEL_BUCKET}/{DEMO_MODEL_PREFIX}"
        with scoped_environ(env):
            storage.Store.for_uri(model_uri).upload_dir(model_dir, "", marker=False)
        params = _parameter_count(model_dir)
        print(f"  uploaded tiny Llama ({params / 1e6:.2f}M parameters) -> {model_uri}")
        for doc in docs:
            spec = doc.setdefault("spec", {})
            base_model = spec.get("baseModel") or {}
            if base_model.get("fromJob"):
                if base_model.pop("parameters", None) is not None:
                    print(f"  {doc.get('metadata', {}).get('name')}: spec.baseModel.parameters dropped: the size "
                          f"comes from its base job {base_model['fromJob']} (the tiny model)")
                continue
            base = base_model.get("uri", "?")
            print(f"  NOTE: a tiny Llama built here stands in for {base}: there is no model hub on this machine.")
            spec["baseModel"] = {"uri": model_uri, "parameters": f"{params / 1e6:.2f}M"}
        yield env, server
    finally:
        if keep:
            print(f"\nS3 server kept at {server.endpoint_url} (AWS_ACCESS_KEY_ID={server.access_key}); "
                  "press Ctrl+C to stop it")
            with contextlib.suppress(KeyboardInterrupt):
                while server.running:
                    time.sleep(1)
        server.close()
        shutil.rmtree(work / "s3", ignore_errors=True)  # the server's data (and the demo's output in it)
        shutil.rmtree(work / "tiny-model", ignore_errors=True)


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="np") as fh:
        return sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())  # noqa: SIM118


# ------------------------------------------------------------------------------------------------
# Running and watching
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _draw(bar: Any, report: Any) -> None:
    if bar.total != report.total_steps:
        bar.total = report.total_steps
    bar.n = report.step
    bar.set_description(report.phase)
    post = {}
    if report.loss is not None:
        post["loss"] = f"{report.loss:.4f}"
    if report.tokens_per_second:
        post["tok/s"] = f"{report.tokens_per_second:,.0f}"
    bar.set_postfix(post, refresh=False)
    bar.refresh()


def watch(proc: subprocess.Popen[bytes], output_uri: str, env: dict[str, str], tty: bool) -> Any:
    """Show progress from the report until the trainer exits (a tqdm bar on a terminal, else lines);
    returns the last report."""
    from tqdm import tqdm

    from finetune_trainer.report import read_report
    from finetune_trainer.storage import Store

    with scoped_environ(env):
        store = Store.for_uri(output_uri, retry_seconds=5)
        bar = tqdm(total=0, unit="step", dynamic_ncols=True, desc="starting", file=sys.stdout) if tty else None
        last = None
        shown: tuple[str, int] = ("", -1)
        while True:
            finished = proc.poll() is not None
            with contextlib.suppress(Exception):  # the report may not exist yet, or be mid-write
                report = read_report(store)
                if report is not None:
                    last = report
                    if bar is not None:
                        _draw(bar, report)
                    else:
                        # No terminal (CI, a pipe): a line per phase and per tenth of the steps.
                        tenth = report.step * 10 // max(report.total_steps, 1)
                        if (report.phase, tenth) != shown:
                            shown = (report.phase, tenth)
                            loss = f", loss {report.loss:.4f}" if report.loss is not None else ""
                            print(f"  {report.phase}: step {report.step}/{report.total_steps}{loss}", flush=True)
            if finished:
                break
            time.sleep(0.5)
        if bar is not None:
            bar.close()
        return last


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if percent else f"{value:.3f}"


def evaluation_table(evaluation: Any) -> str:
    """Base vs fine-tuned scores as a small text table; with retrieval, both again with passages."""
    rows = [
        (f"accuracy ({evaluation.accuracy_metric or 'n/a'})", "accuracy", True),
        ("terminology", "terminology", True),
        ("hallucination (lower is better)", "hallucination", True),
        ("format compliance", "format_compliance", True),
        ("eval loss", "eval_loss", False),
        ("perplexity", "perplexity", False),
    ]
    rag = getattr(evaluation, "with_retrieval", None)
    columns = [("base", evaluation.base), ("fine-tuned", evaluation.tuned)]
    if rag is not None:
        columns += [("base+RAG", rag.base), ("tuned+RAG", rag.tuned)]
    # On held-out preference pairs (objective dpo, or evaluation.preferenceTestSet): only when they were scored.
    rows += [row for row in (("preference accuracy", "preference_accuracy", True), ("reward margin", "reward_margin",
                                                                                   False))
             if any(getattr(scores, row[1], None) is not None for _, scores in columns)]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'metric':<{width}}" + "".join(f"  {name:>10}" for name, _ in columns),
             f"  {'-' * width}" + f"  {'-' * 10}" * len(columns)]
    for label, field, percent in rows:
        lines.append(f"  {label:<{width}}" + "".join(f"  {_fmt(getattr(scores, field), percent):>10}"
                                                      for _, scores in columns))
    lines.append(f"  ({evaluation.examples} test examples" + (
        "; +RAG: each prompt with its top-k passages from spec.retrieval.corpus)" if rag is not None else ")"))
    return "\n".join(lines)


def _arrow(base: float | None, tuned: float | None, percent: bool) -> str:
    return f"{_fmt(base, percent)} -> {_fmt(tuned, percent)}"


def chain_table(stages: list[tuple[str, Any, float]]) -> str:
    """One line per stage (name, evaluation, spec.dpo.beta) of a chain: preference accuracy and reward margin on the
    held-out pairs, hallucination on the instruction test set, each as the stage's starting model -> its result
    (`-` where not measured). The margin scales with beta, so each row names its own."""
    header = ("stage", "preference accuracy", "reward margin (beta)", "hallucination")
    rows = []
    for name, evaluation, beta in stages:
        if evaluation is None:
            rows.append((name, "-", "-", "-"))
            continue
        base, tuned = evaluation.base, evaluation.tuned
        rows.append((name, _arrow(base.preference_accuracy, tuned.preference_accuracy, True),
                     f"{_arrow(base.reward_margin, tuned.reward_margin, False)} ({beta:g})",
                     _arrow(base.hallucination, tuned.hallucination, True)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)),
             "  " + "  ".join("-" * w for w in widths)]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def hallucination_advice(spec: Any, evaluation: Any) -> str | None:
    """What the operator's HallucinationHigh condition would say of this run (no spec.retrieval, the fine-tuned
    hallucination score above evaluation.hallucinationThreshold), or None."""
    score = evaluation.tuned.hallucination
    threshold = spec.evaluation.resolved_hallucination_threshold()
    if spec.retrieval is not None or score is None or score <= threshold:
        return None
    return (f"HallucinationHigh: the fine-tuned model's hallucination score is {score:.1%}, above "
            f"evaluation.hallucinationThreshold {threshold:.1%} (a cluster run gets this condition and a Warning "
            "event). Consider spec.retrieval: `make demo-rag` runs this example with a retrieval corpus.")


def _listing(output_uri: str, env: dict[str, str]) -> tuple[str, list[str]]:
    from finetune_trainer.storage import Store

    with scoped_environ(env):
        store = Store.for_uri(output_uri, retry_seconds=5)
        return store.child(""), store.list("")


#: The model card and its pictures (finetune_trainer/charts.py), as `finetune run` names them.
CARD_FILES = (("model card", "README.md"), ("loss curve", "loss.png"), ("evaluation chart", "evaluation.png"))


def card_files(output: str, env: dict[str, str], copy_to: Path) -> list[tuple[str, Path]]:
    """(what, local path) of the model card and its charts: in the output when it is a directory, else
    copied into `copy_to` (the demo's S3 server and its data are gone after the run; the copy stays), the
    card beside its pictures so its relative links work there too."""
    if "://" not in output:
        return [(what, Path(output) / name) for what, name in CARD_FILES if (Path(output) / name).is_file()]
    from finetune_trainer.storage import Store

    found = []
    with scoped_environ(env):
        store = Store.for_uri(output, retry_seconds=5)
        for what, name in CARD_FILES:
            if store.exists(name):
                found.append((what, store.download_file(name, copy_to / name)))
    return found


def summarize(root: str, keys: list[str]) -> list[str]:
    """Output keys, directories (model/, merged/, status/, checkpoints/step-N/) collapsed with file counts."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split("/")
        if parts[0] == "checkpoints" and len(parts) > 2:
            name = "/".join(parts[:2]) + "/"
        elif len(parts) > 1:
            name = parts[0] + "/"
        else:
            name = key
        groups[name] = groups.get(name, 0) + 1
    base = root.rstrip("/") + "/"
    return [f"{base}{name}  ({count} files)" if name.endswith("/") else f"{base}{name}"
            for name, count in sorted(groups.items())]


@dataclass
class Stage:
    """One manifest of the command line: its document (with --set and demo overrides), the job as validated (a
    chained one still with fromJob), and the plan (None for a chained one until its base job's result is known)."""

    source: Path
    doc: dict[str, Any]
    job: Any = None
    plan: Any = None

    @property
    def name(self) -> str:
        return str(self.job.metadata.name)

    @property
    def from_job(self) -> str | None:
        return self.job.spec.base_model.from_job  # type: ignore[no-any-return]


@dataclass
class Finished:
    """A stage that Succeeded (gates passed): what a later stage chained to it is resolved from."""

    job: Any  # FineTuneJob as run (a chained one with its base model resolved)
    plan: Any
    report: Any  # the trainer's final TrainerReport
    base: Any = None  # BaseJobStatus when it was itself chained


def _validate_stage(stage: Stage) -> None:
    """Validate and plan `stage.doc`; a chained stage without spec.baseModel.parameters cannot be planned before
    its base job ran (`sizing.BaseJobUnresolved`), which is not an error here: it is planned once resolved."""
    from finetune_operator import manifests

    loaded = manifests.validate_document(stage.doc, str(stage.source))
    chained_unplanned = loaded.job is not None and loaded.job.spec.base_model.from_job is not None and all(
        issue.path == "spec.baseModel.fromJob" for issue in loaded.issues)
    if not loaded.ok and not chained_unplanned:
        raise ManifestError(f"{stage.source} is not a valid FineTuneJob:\n" + "\n".join(f"  {i}" for i in loaded.issues))
    stage.job, stage.plan = loaded.job, loaded.plan


def check_chain(stages: list[Stage]) -> None:
    """Every fromJob names an earlier manifest (same namespace); names are unique. Checked before anything runs."""
    seen: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in seen:
            raise ManifestError(f"{stage.source} and {seen[stage.name].source} are both named {stage.name!r}: "
                                "give each stage of a chain its own metadata.name")
        if stage.from_job is not None:
            base = seen.get(stage.from_job)
            if base is None:
                earlier = ", ".join(f"{s.name} ({s.source})" for s in seen.values()) or "none"
                later = any(s.name == stage.from_job for s in stages)
                raise ManifestError(
                    f"{stage.source}: spec.baseModel.fromJob names {stage.from_job!r}, which is not the metadata.name "
                    f"of an earlier manifest on the command line (earlier: {earlier}); "
                    + ("list its manifest before this one" if later else
                       f"add its manifest before this one: finetune run --local BASE.yaml {stage.source}"))
            if base.job.metadata.namespace != stage.job.metadata.namespace:
                raise ManifestError(f"{stage.source}: spec.baseModel.fromJob names {stage.from_job!r} in namespace "
                                    f"{base.job.metadata.namespace}, this job is in {stage.job.metadata.namespace}: "
                                    "a chain stays in one namespace")
        seen[stage.name] = stage


def resolve_chained(stage: Stage, base: Finished) -> tuple[Any, Any, Any]:
    """(job, plan, BaseJobStatus) of a chained stage, from its base job's outcome: `chain.resolve` on a status built
    as the operator sees a Succeeded job (its plan, artifacts and own chain), then `chain.apply`, validated again."""
    from finetune_operator import chain
    from finetune_operator.spec import FineTuneJobStatus

    status = FineTuneJobStatus(phase="Succeeded", plan=base.plan, base_job=base.base,
                               artifacts={kind: _as_uri(uri) for kind, uri in base.report.artifacts.items()})
    try:
        resolved = chain.resolve(base.job, status, uid=base.job.metadata.uid)
    except chain.BaseUnchainable as err:
        raise ManifestError(f"{stage.source}: cannot start from {base.job.metadata.name}: {err}") from None
    spec = chain.apply(stage.job.spec, resolved)
    doc = copy.deepcopy(stage.doc)
    doc["spec"]["baseModel"] = spec.base_model.wire()
    resolved_stage = Stage(stage.source, doc)
    _validate_stage(resolved_stage)
    return resolved_stage.job, resolved_stage.plan, resolved


def _as_uri(location: str) -> str:
    """An artifact location as a URI: a local output directory's paths become file:// URIs (a spec's baseModel.uri
    must be one; the trainer is allowed to read there, `_allowed_roots`)."""
    return location if "://" in location else f"file://{Path(location).resolve()}{'/' if location.endswith('/') else ''}"


def _stage_output(args: argparse.Namespace, job: Any, chained: bool) -> str:
    output = args.output or job.spec.output.uri
    if chained and args.output:  # several manifests: one directory (or prefix) per stage under --output
        output = f"{args.output.rstrip('/')}/{job.metadata.name}" + ("/" if "://" in args.output else "")
    return output if "://" in output else str(Path(output).resolve())


def run_local(args: argparse.Namespace) -> int:
    if not args.local:
        raise UsageError("only local runs are supported by `finetune run` for now: add --local "
                         "(for a cluster, `kubectl apply -f FILE`)")
    if args.processes < 1:
        raise UsageError("--processes must be at least 1")
    stages = [Stage(Path(f), load_manifest(Path(f))) for f in args.files]
    overrides = [parse_override(text) for text in args.overrides]
    for stage in stages:
        for path, value in overrides:
            print(f"override: {set_path(stage.doc, path, copy.deepcopy(value))} = {value!r}"
                  + (f"  ({stage.source})" if len(stages) > 1 else ""))
        _validate_stage(stage)
    check_chain(stages)
    for stage in stages:
        if stage.plan is not None:
            print(f"plan on a cluster{f' ({stage.name})' if len(stages) > 1 else ''}: method {stage.plan.method}, "
                  f"{stage.plan.gpus}x{stage.plan.gpu_memory_gib}GiB GPU ({stage.plan.source}): {stage.plan.reason}")
        else:
            print(f"plan on a cluster ({stage.name}): once {stage.from_job} succeeded (spec.baseModel.fromJob)")
    chained = len(stages) > 1
    outputs = [_stage_output(args, stage.job, chained) for stage in stages]
    if len(set(outputs)) < len(outputs):
        raise UsageError(f"two stages write to the same output ({', '.join(outputs)}): give each its own "
                         "spec.output.uri, or pass --output DIR (each stage then writes under DIR/<name>/)")
    work = Path(tempfile.mkdtemp(prefix="finetune-local-"))
    print(f"running locally: {args.processes} process(es), work directory {work}")

    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if args.demo:
            print("demo setup:")
            env, _server = stack.enter_context(demo_environment([stage.doc for stage in stages], work, args.keep_s3))
            print("demo overrides for the tiny stand-in:")
            for stage in stages:
                _demo_overrides(stage, overrides, chained)
                _validate_stage(stage)
        finished: dict[str, Finished] = {}
        try:
            for i, (stage, output) in enumerate(zip(stages, outputs, strict=True), 1):
                job, plan, base = stage.job, stage.plan, None
                if chained:
                    print(f"\n=== stage {i}/{len(stages)}: {stage.name} ({stage.source}, objective "
                          f"{job.spec.objective}) ===")
                if stage.from_job is not None:
                    job, plan, base = resolve_chained(stage, finished[stage.from_job])
                    merges = ", ".join(base.adapters) or "none (a whole model)"
                    print(f"starts from {stage.from_job}'s result: {base.model_uri}; adapters merged in first: {merges}")
                    print(f"plan on a cluster: method {plan.method}, {plan.gpus}x{plan.gpu_memory_gib}GiB GPU "
                          f"({plan.source}): {plan.reason}")
                if "://" not in output:
                    Path(output).mkdir(parents=True, exist_ok=True)
                code = _run_job(args, job, plan, output, work, env, base, list(finished.values()),
                                f"trainer-{stage.name}" if chained else "trainer")
                if code != 0:
                    if chained:
                        rest = [s.name for s in stages[i:]]
                        print(f"\nchain stopped: stage {i}/{len(stages)} {stage.name} ({stage.source}) "
                              f"{'missed its gates' if code == EXIT_GATES_FAILED else 'failed'} (exit code {code})"
                              + (f"; not run: {', '.join(rest)}" if rest else ""))
                    return code
                if chained:
                    # Where this stage really wrote (--output), not its manifest's output.uri: what a later stage's
                    # provenance records as this stage's output.
                    ran_at = _as_uri(output if output.endswith("/") else output + "/")
                    spec = job.spec.model_copy(update={"output": job.spec.output.model_copy(update={"uri": ran_at})})
                    job = job.model_copy(update={"spec": spec})
                    finished[stage.name] = Finished(job, plan, _final_report(output, env), base)
            if chained:
                print("\nchain: base model -> result of each stage (held-out preference pairs; instruction test set)")
                print(chain_table([(name, done.report.evaluation, done.job.spec.resolved_dpo().beta)
                                   for name, done in finished.items()]))
                print("  (reward margin: beta x (log p(chosen) - log p(rejected)) summed over the answer tokens, mean "
                      "over the pairs; preference accuracy: the share of pairs with a positive margin)")
            return 0
        finally:
            if not os.environ.get(ENV_CACHE_DIR):
                shutil.rmtree(work / "cache", ignore_errors=True)  # copies of the model and data


def _demo_overrides(stage: Stage, overrides: list[tuple[str, Any]], chained: bool) -> None:
    """The demo's settings for the tiny stand-in (DEMO_OVERRIDES; a dpo stage's own on top), printed with why;
    --set wins."""
    job, plan = stage.job, stage.plan
    method = plan.method if plan is not None else job.spec.method
    has_pilot = job.spec.pilot is not None
    extra = DEMO_DPO_OVERRIDES if job.spec.objective == "dpo" else []
    chosen: dict[str, tuple[Any, str]] = {}
    for path, value, why in [*DEMO_OVERRIDES, *extra]:
        if path.startswith("lora.") and method not in ("lora", "qlora", "auto") and not has_pilot:
            continue  # LoRA settings mean nothing to full, prefix or prompt tuning (but to their pilot)
        if path.startswith("pilot.") and not has_pilot:
            continue
        chosen[path] = (value, why)
    for path, (value, why) in chosen.items():
        if full_path(path) not in [full_path(own) for own, _ in overrides]:  # --set wins
            print(f"  {set_path(stage.doc, path, copy.deepcopy(value))} = {value}  ({why})"
                  + (f"  [{stage.name}]" if chained else ""))


def _final_report(output: str, env: dict[str, str]) -> Any:
    from finetune_trainer.report import read_report
    from finetune_trainer.storage import Store

    with scoped_environ(env):
        return read_report(Store.for_uri(output, retry_seconds=5))


def _run_job(args: argparse.Namespace, job: Any, plan: Any, output: str, work: Path, env: dict[str, str],
             base: Any, earlier: list[Finished], label: str) -> int:
    """One FineTuneJob: its pilot first when it has one, then the main run (`base`: where a chained job starts;
    `label`: "trainer", or "trainer-<name>" for a stage of a chain, names its log and card copies)."""
    if earlier:  # the trainer may read the earlier stages' local outputs (file:// URIs of their artifacts)
        env = {**env, ENV_ALLOWED_ROOTS: os.pathsep.join(str(p) for p in _allowed_roots(earlier, work))}
    if job.spec.pilot is not None:
        code = _run_pilot(args, job, output, work, env, base)
        if code != 0:
            return code
        print("\nstage 2/2: the main run")
    config = resolve(job, plan, base=base)  # as the operator freezes a chained job's config
    return _run_stage(args, config, output, work, env, label)


def _allowed_roots(earlier: list[Finished], work: Path) -> list[Path]:
    """The roots a file:// URI may be under for the trainer (storage.allowed_roots) plus the earlier stages' local
    output directories (a chain through `--output DIR` outside the temp directory)."""
    from finetune_trainer import storage

    roots = [*storage.allowed_roots(), work / "cache"]
    for done in earlier:
        for uri in done.report.artifacts.values():
            if "://" not in uri or uri.startswith("file://"):
                roots.append(Path(uri.removeprefix("file://")).parent)
    return list(dict.fromkeys(roots))


def _run_pilot(args: argparse.Namespace, job: Any, output: str, work: Path, env: dict[str, str], base: Any = None) -> int:
    """Stage 1 of a job with spec.pilot: the LoRA pilot, as the operator runs it; its exit code."""
    plan = pilot_stage.plan(job)
    config = resolve(pilot_stage.pilot_job(job), plan, stage="pilot", base=base)  # a chained job's pilot starts there too
    hp = config.spec.hyperparameters
    bound = f"{hp.max_steps} steps" if hp.max_steps else f"{hp.epochs:g} of an epoch"
    print(f"\nstage 1/2: LoRA pilot ({bound}; on a cluster {plan.gpus}x{plan.gpu_memory_gib}GiB GPU), gates: "
          + "; ".join(_gate_text(g) for g in config.spec.evaluation.gates))
    if "://" not in output:
        Path(pilot_stage.output_uri(output)).mkdir(parents=True, exist_ok=True)
    code = _run_stage(args, config, pilot_stage.output_uri(output), work, env, "pilot")
    if code == EXIT_GATES_FAILED:
        print("\nPilotGatesFailed: the pilot missed pilot.gates; the main run was not started "
              f"(the pilot's adapter is kept in {pilot_stage.output_uri(output)}model/)")
    elif code != 0:
        print("\nPilotFailed: the pilot did not finish; the main run was not started")
    else:
        print("\nthe pilot passed pilot.gates")
    return code


def _gate_text(gate: Any) -> str:
    bounds = [f"{name} {value:g}" for name, value in (("min", gate.min), ("max", gate.max),
                                                      ("minImprovement", gate.min_improvement)) if value is not None]
    return f"{gate.metric} {', '.join(bounds)}"


def _run_stage(args: argparse.Namespace, config: TrainerConfig, output: str, work: Path, env: dict[str, str],
               label: str) -> int:
    """Run the trainer for one config with a progress display; print the outcome; return its exit code."""
    config_path = work / f"{label}.json"
    config_path.write_text(config_json(config))
    child_env = {**os.environ, **env,
                 ENV_CONFIG: str(config_path), ENV_OUTPUT_URI: output, ENV_NUM_MACHINES: "1",
                 ENV_PROCS_PER_MACHINE: str(args.processes), ENV_MAIN_PORT: str(_free_port()),
                 ENV_CACHE_DIR: os.environ.get(ENV_CACHE_DIR) or str(work / "cache")}
    child_env.pop("JOB_COMPLETION_INDEX", None)
    child_env.pop("FT_MAIN_ADDRESS", None)
    if args.log:
        log_path = Path(args.log) if label == "trainer" else Path(f"{args.log}.{label}")
    else:
        log_path = work / f"{label}.log"
    print(f"output: {output}\ntrainer log: {log_path}")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer.launch"], env=child_env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            report = watch(proc, output, env, sys.stdout.isatty())
        except KeyboardInterrupt:
            print("\ninterrupted: the trainer saves a checkpoint and stops (Ctrl+C again to abandon it)")
            proc.terminate()  # the launcher passes SIGTERM on to the trainer processes
            proc.wait()
            report = None
    code = proc.returncode
    print(f"trainer exited with code {code}")
    if code == EXIT_PREEMPTED:
        print(f"stopped after a checkpoint; run the same command with --output {args.output or output} to resume "
              "from it")
    if report is not None and report.error is not None:
        print(f"error: {report.error.reason}: {report.error.message}")
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print("last lines of the trainer log:\n  " + "\n  ".join(tail))
    if code in (0, 4):
        print("\nartifacts:")
        for line in summarize(*_listing(output, env)):
            print(f"  {line}")
        if args.demo and output.startswith("s3://") and not args.keep_s3:
            print("  (the demo's S3 server and its data are removed at exit: add --keep-s3 to browse them, "
                  "or --output DIR to keep the artifacts in a directory)")
        card = card_files(output, env, work / ("model-card" if label == "trainer" else f"{label}-model-card"))
        if card:
            print("\nmodel card and charts" + (" (copied here)" if "://" in output else "") + ":")
            for what, path in card:
                print(f"  {what + ':':<18}{path}")
    if report is not None and report.evaluation is not None:
        print(f"\nevaluation (base vs {'pilot' if label == 'pilot' else 'fine-tuned'}):")
        print(evaluation_table(report.evaluation))
        advice = hallucination_advice(config.spec, report.evaluation) if label != "pilot" else None
        if advice:
            print(f"\n{advice}")
    return code


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return run_local(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR if isinstance(err, ManifestError) else 2
