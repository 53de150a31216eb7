"""`finetune run FILE --local`: run a FineTuneJob manifest on this machine with the pods' code.

The manifest is validated and planned exactly as the operator does (`manifests.validate_document`,
`contract.resolve`), written as the trainer config, and run through the same launcher a pod runs
(`python -m finetune_trainer.launch`) with `--processes N` local processes (gloo on CPU). The progress bar
is drawn from the trainer's progress report (`<output>/status/report.json`), the same object the operator
reads; the trainer's own log goes to a file (its tail is printed when the run fails).

Flags:
  --local               run here (required for now: cluster runs go through `kubectl apply`)
  --processes N         trainer processes on this machine (default 1)
  --output URI_OR_DIR   write output there instead of spec.output.uri (a plain directory is allowed)
  --set PATH=VALUE      override a spec field, e.g. hyperparameters.learningRate=0.002 (repeatable;
                        VALUE is YAML; PATH is relative to spec unless it starts with metadata. or spec.)
  --demo                self-contained demo: a local S3 server, the bundled healthcare sample at the
                        manifest's dataset URIs, and a tiny Llama standing in for the base model
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
from pathlib import Path
from typing import Any

import yaml

from finetune_operator import pilot as pilot_stage
from finetune_operator.contract import (
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune run", description="Run a FineTuneJob manifest on this machine.")
    parser.add_argument("file", help="FineTuneJob manifest (YAML)")
    parser.add_argument("--local", action="store_true", help="run on this machine (required for now)")
    parser.add_argument("--processes", type=int, default=1, help="trainer processes (default 1)")
    parser.add_argument("--output", help="output URI or directory instead of spec.output.uri")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a spec field (repeatable), e.g. hyperparameters.learningRate=0.002")
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


def validate(doc: dict[str, Any], source: str) -> tuple[Any, Any]:
    """(FineTuneJob, Plan), or UsageError listing every problem with its field."""
    from finetune_operator import manifests

    loaded = manifests.validate_document(doc, source)
    if not loaded.ok:
        raise ManifestError(f"{source} is not a valid FineTuneJob:\n" + "\n".join(f"  {i}" for i in loaded.issues))
    return loaded.job, loaded.plan


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


@contextlib.contextmanager
def demo_environment(doc: dict[str, Any], work: Path, keep: bool) -> Iterator[tuple[dict[str, str], Any]]:
    """Start the local S3 server, upload the sample and the tiny model; yields (env, server)."""
    from finetune_trainer import storage, tiny
    from finetune_trainer.s3server import LocalS3

    data = tiny.DATA_DIR
    server = LocalS3(work / "s3")
    server.start()
    try:
        env = server.env()
        client = server.client()
        spec = doc.get("spec", {})
        uploads: list[tuple[str, Path]] = []
        dataset = spec.get("dataset", {})
        evaluation = spec.get("evaluation", {})
        for uri, local in ((dataset.get("train"), data / "healthcare_train.jsonl"),
                           (dataset.get("validation"), data / "healthcare_test.jsonl"),
                           (evaluation.get("testSet"), data / "healthcare_test.jsonl"),
                           (evaluation.get("glossary"), data / "healthcare_glossary.txt"),
                           ((spec.get("retrieval") or {}).get("corpus"), data / "healthcare_corpus.jsonl")):
            if isinstance(uri, str) and uri.startswith("s3://"):
                # A prefix (ending in /) gets the file under its own name.
                uploads.append((uri + local.name if uri.endswith("/") else uri, local))
        output = spec.get("output", {}).get("uri")
        buckets = {_split_s3(uri)[0] for uri, _ in uploads} | {DEMO_MODEL_BUCKET}
        if isinstance(output, str) and output.startswith("s3://"):
            buckets.add(_split_s3(output)[0])
        for bucket in sorted(buckets):
            server.create_bucket(bucket)
        for uri, local in uploads:
            bucket, key = _split_s3(uri)
            client.upload_file(str(local), bucket, key)
            print(f"  uploaded {local.name:<26} -> {uri}")

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = tiny.build_tiny_model(work / "tiny-model")
        model_uri = f"s3://{DEMO_MODEL_BUCKET}/{DEMO_MODEL_PREFIX}"
        with scoped_environ(env):
            storage.Store.for_uri(model_uri).upload_dir(model_dir, "", marker=False)
        base = spec.get("baseModel", {}).get("uri", "?")
        params = _parameter_count(model_dir)
        print(f"  uploaded tiny Llama ({params / 1e6:.2f}M parameters) -> {model_uri}")
        print(f"  NOTE: a tiny Llama built here stands in for {base}: there is no model hub on this machine.")
        spec.setdefault("baseModel", {})
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
    width = max(len(r[0]) for r in rows)
    rag = getattr(evaluation, "with_retrieval", None)
    columns = [("base", evaluation.base), ("fine-tuned", evaluation.tuned)]
    if rag is not None:
        columns += [("base+RAG", rag.base), ("tuned+RAG", rag.tuned)]
    lines = [f"  {'metric':<{width}}" + "".join(f"  {name:>10}" for name, _ in columns),
             f"  {'-' * width}" + f"  {'-' * 10}" * len(columns)]
    for label, field, percent in rows:
        lines.append(f"  {label:<{width}}" + "".join(f"  {_fmt(getattr(scores, field), percent):>10}"
                                                      for _, scores in columns))
    lines.append(f"  ({evaluation.examples} test examples" + (
        "; +RAG: each prompt with its top-k passages from spec.retrieval.corpus)" if rag is not None else ")"))
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


def run_local(args: argparse.Namespace) -> int:
    if not args.local:
        raise UsageError("only local runs are supported by `finetune run` for now: add --local "
                         "(for a cluster, `kubectl apply -f FILE`)")
    if args.processes < 1:
        raise UsageError("--processes must be at least 1")
    source = Path(args.file)
    doc = load_manifest(source)
    overrides = [parse_override(text) for text in args.overrides]
    for path, value in overrides:
        print(f"override: {set_path(doc, path, value)} = {value!r}")
    job, plan = validate(doc, str(source))
    print(f"plan on a cluster: method {plan.method}, {plan.gpus}x{plan.gpu_memory_gib}GiB GPU ({plan.source}): "
          f"{plan.reason}")
    work = Path(tempfile.mkdtemp(prefix="finetune-local-"))
    print(f"running locally: {args.processes} process(es), work directory {work}")

    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if args.demo:
            print("demo setup:")
            env, _server = stack.enter_context(demo_environment(doc, work, args.keep_s3))
            print("demo overrides for the tiny stand-in:")
            has_pilot = job.spec.pilot is not None
            for path, value, why in DEMO_OVERRIDES:
                if path.startswith("lora.") and plan.method not in ("lora", "qlora") and not has_pilot:
                    continue  # LoRA settings mean nothing to full, prefix or prompt tuning (but to their pilot)
                if path.startswith("pilot.") and not has_pilot:
                    continue
                if full_path(path) not in [full_path(own) for own, _ in overrides]:  # --set wins
                    print(f"  {set_path(doc, path, copy.deepcopy(value))} = {value}  ({why})")
            job, plan = validate(doc, str(source))
        output = args.output or job.spec.output.uri
        if "://" not in output:
            output = str(Path(output).resolve())
            Path(output).mkdir(parents=True, exist_ok=True)
        try:
            if job.spec.pilot is not None:
                code = _run_pilot(args, job, output, work, env)
                if code != 0:
                    return code
                print("\nstage 2/2: the main run")
            return _run_stage(args, resolve(job, plan), output, work, env, "trainer")
        finally:
            if not os.environ.get(ENV_CACHE_DIR):
                shutil.rmtree(work / "cache", ignore_errors=True)  # copies of the model and data


def _run_pilot(args: argparse.Namespace, job: Any, output: str, work: Path, env: dict[str, str]) -> int:
    """Stage 1 of a job with spec.pilot: the LoRA pilot, as the operator runs it; its exit code."""
    plan = pilot_stage.plan(job)
    config = resolve(pilot_stage.pilot_job(job), plan, stage="pilot")
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
        advice = hallucination_advice(config.spec, report.evaluation) if label == "trainer" else None
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
