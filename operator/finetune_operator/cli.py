"""The `finetune` command.

- `finetune plan FILE... [-o table|json|yaml] [--inspect [--model-dir DIR] [--mount CLAIM=PATH]]`: validate
  manifests and show what the operator would create. `--inspect` reads the base model's architecture from
  its config.json and safetensors headers (`finetune_operator.architecture`) and plans from it; where the
  trainer package is installed and every dataset URI is on this machine (`file://`, `pvc://` with
  `--mount`), it also runs the operator's pre-flight checks here (`finetune_operator.local_preflight`: the
  tokenizer from the model directory, every data row through the trainer's readers) and prints the plan the
  operator completes from them: `method: auto` on the counted examples and `plan.estimate` (steps, hours,
  GPU-hours). A bad row, or an estimate above spec.budget.maxGpuHours, is an invalid manifest; `s3://` or
  `hf://` data, or no trainer, leaves the model-only plan with a note on stderr saying why.
- `finetune run FILE... --local ...`: run a FineTuneJob on this machine, or several in order as a chain
  (spec.baseModel.fromJob naming an earlier one; the trainer package; needs the `train` extra).
- `finetune crd [finetunepolicy|admission-policy]`: print a CustomResourceDefinition (or the admission policy) generated from the spec models.

Exit codes: 0 ok, 1 invalid input (every problem printed, one line each), 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml
from pydantic.alias_generators import to_camel

from finetune_operator import __version__, local_preflight, serving, uris
from finetune_operator.architecture import Architecture, ArchitectureError, read_architecture
from finetune_operator.local_preflight import Mounts
from finetune_operator.manifests import Inspector, Loaded, load_file

EXIT_INVALID = 1
#: The spec's refusal when no size is known (spec.BaseModelSpec); `plan` adds how --inspect helps.
_SIZE_UNKNOWN = "the model size cannot be read from uri"


def _plan_dict(loaded: Loaded, splits: bool = False) -> dict[str, Any]:
    """The plan (and pilot, architecture) of one manifest; with `splits`, also what the local pre-flight
    counted per dataset field (`-o json`)."""
    assert loaded.plan is not None
    out: dict[str, Any] = {
        "name": loaded.name,
        "namespace": loaded.namespace,
        "plan": loaded.plan.model_dump(by_alias=True, mode="json"),
    }
    if loaded.pilot_plan is not None:
        out["pilot"] = loaded.pilot_plan.model_dump(by_alias=True, mode="json")
    if loaded.architecture is not None:
        # camelCase like the plan's fields
        out["architecture"] = {to_camel(k): v for k, v in dataclasses.asdict(loaded.architecture).items()}
    if splits and loaded.preflight is not None:
        # per field, without the per-file list (a directory of data can hold many files)
        out["preflight"] = {"splits": [s.model_dump(by_alias=True, mode="json", exclude={"files"})
                                       for s in loaded.preflight.splits]}
    return out


def inspector(model_dir: str | None, mounts: Mounts) -> Inspector:
    """Reads the architecture of the model a URI names from a path on this machine.

    `file://` URIs are read where they point; `pvc://claim/path` under the local mount given for the claim
    (`mounts`, from --mount CLAIM=PATH); `model_dir`, when given, is read for every URI (a local copy of an
    `hf://` or `s3://` model). Anything else cannot be read from here, and the error says what to pass.
    """

    def read(uri: str) -> Architecture:
        if model_dir is not None:
            return read_architecture(model_dir)
        local = mounts.local(uri)
        if local is not None:
            return read_architecture(local)
        parsed = uris.parse(uri)
        if parsed.scheme == "pvc":
            raise ArchitectureError(
                f"{uri} is on the claim {parsed.authority!r}, which is not mounted here; inspection needs a "
                f"readable path: pass --mount {parsed.authority}=/local/mount/path (or --model-dir DIR)")
        raise ArchitectureError(
            f"{uri} is not on this machine; inspection needs a readable path: download its config.json (and its "
            "*.safetensors files or model.safetensors.index.json) and pass --model-dir DIR")

    return read


def _table(rows: list[Loaded], out: TextIO) -> None:
    header = ["NAME", "NAMESPACE", "METHOD", "GPUS", "GPU-MEMORY", "NODES", "GPUS/NODE", "EST-MEMORY", "SOURCE",
              "MICRO-BATCH", "CHECKPOINTING"]
    body = []
    for r in rows:
        p = r.plan
        assert p is not None
        body.append(
            [
                r.name or "",
                r.namespace or "",
                p.method,
                str(p.gpus),
                f"{p.gpu_memory_gib}GiB",
                str(p.nodes),
                str(p.gpus_per_node),
                f"{p.estimated_memory_gib:g}GiB",
                p.source,
                # the rung the trainer starts at (micro-batch x accumulation), as status.plan.rung
                f"{p.rung.micro_batch}x{p.rung.grad_accum}" if p.rung else "-",
                ("on" if p.rung.gradient_checkpointing else "off") if p.rung else "-",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    for line in [header, *body]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip() + "\n")
    out.write("\n")
    for r in rows:
        assert r.plan is not None
        if r.architecture is not None:
            out.write(f"{r.name}: inspected {r.architecture.path}: {r.architecture.describe()}\n")
        out.write(f"{r.name}: {r.plan.reason}\n")
        for warning in r.plan.warnings:
            out.write(f"{r.name}: WARNING: {warning}\n")
        if r.preflight is not None:
            _counts(r, out)
        if r.pilot_plan is not None and r.job is not None and r.job.spec.pilot is not None:
            pp, spec = r.pilot_plan, r.job.spec.pilot
            bound = f"dataFraction {spec.data_fraction:g}" if spec.data_fraction else f"maxSteps {spec.max_steps or 100}"
            out.write(f"{r.name}: pilot first: lora on {pp.gpus}x{pp.gpu_memory_gib}GiB ({bound}, {len(spec.gates)} "
                      f"gate(s)); the {r.plan.method} run's {r.plan.gpus} GPU(s) are requested only after it passes\n")
        for said in serving.describe(r.plan.serving) if r.plan.serving is not None else []:
            out.write(f"{r.name}: serving: {said}\n")


def _counts(r: Loaded, out: TextIO) -> None:
    """What the local pre-flight counted per dataset field, and the plan's cost estimate."""
    assert r.preflight is not None and r.plan is not None
    for split in r.preflight.splits:
        extra = [f"{split.skipped_rows:,} invalid row(s) skipped"] if split.skipped_rows else []
        if split.longer_than_max_seq_length:
            extra.append(f"{split.longer_than_max_seq_length:,} of the tokenized rows longer than maxSeqLength")
        if split.pairs is not None:  # preference data: what DPO trains on, and whether length could stand in
            extra.insert(0, f"{split.pairs:,} pairs" + (
                f", {split.tokens_per_pair:,.1f} tokens per pair" if split.tokens_per_pair is not None else "") + (
                f", length bias {split.length_bias:+.1f} tokens (chosen - rejected)"
                if split.length_bias is not None else ""))
        sample = sum(f.sample_rows for f in split.files)
        sampled = f", sampled: tokens extrapolated from {sample:,} rows" if split.sampled else ""
        out.write(f"{r.name}: data: {split.field} {split.uri}: {split.examples:,} examples ({split.format}), "
                  f"{split.tokens:,} tokens{sampled}" + "".join(f"; {e}" for e in extra) + "\n")
    estimate = r.plan.estimate
    if estimate is None:
        return
    out.write(f"{r.name}: estimate: {estimate.steps:,} steps, {estimate.tokens_trained:,} tokens trained, "
              f"{estimate.hours:g} h on {r.plan.gpus} GPU(s), {estimate.gpu_hours:g} GPU-hours\n")
    out.write(f"{r.name}: estimate basis: {estimate.basis}\n")


def _yaml_stream(rows: list[Loaded], image: str | None, out: TextIO) -> None:
    """Plan as comments, then the children as documents that `kubectl apply -f -` accepts."""
    from finetune_operator import render, settings

    config = settings.OperatorSettings.from_env()
    if image:
        config = dataclasses.replace(config, trainer_image=image)
    from finetune_operator import pilot

    docs: list[str] = []
    for r in rows:
        assert r.job is not None and r.plan is not None
        plan_text = yaml.safe_dump(_plan_dict(r), sort_keys=False, width=10_000)
        comment = "".join(f"# {line}\n" for line in plan_text.splitlines())
        if r.job.spec.base_model.from_job is not None:
            # A chained stage starts from its base job's result, which is not known before that job succeeded:
            # the operator renders its children then (finetune_operator.chain), so there is nothing to show yet.
            docs.append(comment + f"# spec.baseModel.fromJob: the operator creates this job's children once FineTuneJob "
                        f"{r.job.spec.base_model.from_job} Succeeded (this job starts from its result)\n")
            continue
        if r.pilot_plan is not None:
            # What the operator creates first: the pilot stage. Its main stage follows only once the pilot
            # passed its gates, which only the operator can tell.
            comment += ("# spec.pilot: these are the LoRA pilot's children; the operator creates the main run's "
                        "only after the pilot passed pilot.gates\n")
            # A fresh rendezvous id, as the operator draws one when it creates the ConfigMap.
            children = render.render_children(pilot.pilot_job(r.job), r.pilot_plan, config, pilot.STAGE,
                                              rendezvous_id=secrets.token_hex(16))
        else:
            children = render.render_children(r.job, r.plan, config, rendezvous_id=secrets.token_hex(16))
        for i, child in enumerate(children):
            body = yaml.safe_dump(child, sort_keys=False, width=120)
            docs.append((comment if i == 0 else "") + body)
    out.write("---\n".join(docs))


def cmd_plan(args: argparse.Namespace) -> int:
    inspect: Inspector | None = None
    mounts = Mounts({})
    if args.inspect:
        try:
            mounts = Mounts.parse(args.mount)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        inspect = inspector(args.model_dir, mounts)
    elif args.model_dir or args.mount:
        print("error: --model-dir and --mount are for --inspect; add --inspect", file=sys.stderr)
        return 2
    loaded: list[Loaded] = []
    for path in args.files:
        loaded.extend(load_file(path, inspect))
    if inspect is not None:
        _count_data(loaded, mounts)
    bad = [item for item in loaded if not item.ok]
    if bad:
        # Nothing is printed to stdout when anything is invalid, so `| kubectl apply -f -` applies nothing.
        for item in bad:
            for issue in item.issues:
                hint = ""
                if inspect is None and _SIZE_UNKNOWN in issue.message:
                    hint = ("; or run `finetune plan --inspect` to read it from the model's config.json (file:// "
                            "URIs, pvc:// with --mount, or a local copy with --model-dir)")
                print(f"{item.label}: {issue}{hint}", file=sys.stderr)
        count = sum(len(i.issues) for i in bad)
        print(f"error: {count} problem(s) in {len(bad)} of {len(loaded)} manifest(s)", file=sys.stderr)
        return EXIT_INVALID
    if args.output == "json":
        data = [_plan_dict(item, splits=True) for item in loaded]
        json.dump(data[0] if len(data) == 1 else data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.output == "yaml":
        _yaml_stream(loaded, args.image, sys.stdout)
    else:
        _table(loaded, sys.stdout)
    return 0


def _count_data(loaded: list[Loaded], mounts: Mounts) -> None:
    """--inspect: count each valid manifest's data with the pre-flight's checks where it can
    (`local_preflight.count`); a note on stderr for each whose data was not counted, and why."""
    todo = [item for item in loaded if item.ok and item.architecture is not None]
    missing = local_preflight.trainer_missing() if todo else None
    if missing is not None:
        # the same for every manifest: said once
        print(f"note: {missing}", file=sys.stderr)
        return
    for item in todo:
        note = local_preflight.count(item, mounts)
        if note is not None:
            print(f"{item.label}: note: {note}", file=sys.stderr)


def cmd_crd(args: argparse.Namespace) -> int:
    from finetune_operator import policy
    from finetune_operator.crd import crd_yaml

    sys.stdout.write({"finetunejob": crd_yaml, "finetunepolicy": policy.policy_crd_yaml,
                      "admission-policy": policy.admission_policy_template}[args.kind]())
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    try:
        from finetune_trainer import local
    except ImportError as err:
        print(
            f"error: `finetune run` needs the trainer ({err}); install it with "
            "pip install 'finetune-operator[train]' -c constraints.txt",
            file=sys.stderr,
        )
        return 2
    return local.main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="FineTuneJob planning and local runs.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="validate manifests and print their sizing plans")
    plan.add_argument("files", nargs="+", metavar="FILE", help="FineTuneJob manifests (YAML, multi-document allowed)")
    plan.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    plan.add_argument("--image", help="trainer image for -o yaml (default: $FT_TRAINER_IMAGE or the built-in)")
    plan.add_argument("--inspect", action="store_true",
                      help="read the base model's architecture (config.json, safetensors headers; never the "
                      "tensors) and plan from it: exact parameters, GQA, vocabulary; baseModel.parameters "
                      "becomes optional. With the trainer installed and the data on this machine (file://, "
                      "pvc:// with --mount), also run the operator's pre-flight data checks here (tokenizer "
                      "from the model directory, every row read) and print the plan it completes: examples "
                      "and tokens counted, method auto decided on them, the estimate (steps, hours, "
                      "GPU-hours); a bad row or an estimate above spec.budget.maxGpuHours fails. s3:// and "
                      "hf:// data are not read: a note says so and the plan is the model's alone")
    plan.add_argument("--model-dir", metavar="DIR",
                      help="with --inspect: read this local directory instead of the URI (a downloaded copy of "
                      "an hf:// or s3:// model)")
    plan.add_argument("--mount", action="append", default=[], metavar="CLAIM=PATH",
                      help="with --inspect: where a pvc:// claim is mounted on this machine (repeatable)")
    plan.set_defaults(func=cmd_plan)

    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition (generated from the spec model)")
    crd.add_argument("kind", nargs="?", default="finetunejob",
                     choices=("finetunejob", "finetunepolicy", "admission-policy"),
                     help="finetunepolicy: the FineTunePolicy CRD; admission-policy: the chart's template of the "
                     "ValidatingAdmissionPolicy that enforces FineTunePolicies. Defaults to finetunejob.")
    crd.set_defaults(func=cmd_crd)

    sub.add_parser("run", help="run FineTuneJobs on this machine: finetune run FILE... --local [...]", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return cmd_run(argv[1:])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
