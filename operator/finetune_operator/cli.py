"""The `finetune` command.

- `finetune plan FILE... [-o table|json|yaml]`: validate manifests and show what the operator would create.
- `finetune run FILE --local ...`: run a FineTuneJob on this machine (the trainer package; needs the
  `train` extra).
- `finetune crd`: print the CustomResourceDefinition generated from the spec model.

Exit codes: 0 ok, 1 invalid input (every problem printed, one line each), 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from finetune_operator import __version__
from finetune_operator.manifests import Loaded, load_file

EXIT_INVALID = 1


def _plan_dict(loaded: Loaded) -> dict[str, Any]:
    assert loaded.plan is not None
    data = {
        "name": loaded.name,
        "namespace": loaded.namespace,
        "plan": loaded.plan.model_dump(by_alias=True, mode="json"),
    }
    if loaded.pilot_plan is not None:
        data["pilot"] = loaded.pilot_plan.model_dump(by_alias=True, mode="json")
    return data


def _table(rows: list[Loaded], out: TextIO) -> None:
    header = ["NAME", "NAMESPACE", "METHOD", "GPUS", "GPU-MEMORY", "NODES", "GPUS/NODE", "EST-MEMORY", "SOURCE"]
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
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    for line in [header, *body]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip() + "\n")
    out.write("\n")
    for r in rows:
        assert r.plan is not None
        out.write(f"{r.name}: {r.plan.reason}\n")
        for warning in r.plan.warnings:
            out.write(f"{r.name}: WARNING: {warning}\n")
        if r.pilot_plan is not None and r.job is not None and r.job.spec.pilot is not None:
            pp, spec = r.pilot_plan, r.job.spec.pilot
            bound = f"dataFraction {spec.data_fraction:g}" if spec.data_fraction else f"maxSteps {spec.max_steps or 100}"
            out.write(f"{r.name}: pilot first: lora on {pp.gpus}x{pp.gpu_memory_gib}GiB ({bound}, {len(spec.gates)} "
                      f"gate(s)); the {r.plan.method} run's {r.plan.gpus} GPU(s) are requested only after it passes\n")


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
        if r.pilot_plan is not None:
            # What the operator creates first: the pilot stage. Its main stage follows only once the pilot
            # passed its gates, which only the operator can tell.
            comment += ("# spec.pilot: these are the LoRA pilot's children; the operator creates the main run's "
                        "only after the pilot passed pilot.gates\n")
            children = render.render_children(pilot.pilot_job(r.job), r.pilot_plan, config, pilot.STAGE)
        else:
            children = render.render_children(r.job, r.plan, config)
        for i, child in enumerate(children):
            body = yaml.safe_dump(child, sort_keys=False, width=120)
            docs.append((comment if i == 0 else "") + body)
    out.write("---\n".join(docs))


def cmd_plan(args: argparse.Namespace) -> int:
    loaded: list[Loaded] = []
    for path in args.files:
        loaded.extend(load_file(path))
    bad = [item for item in loaded if not item.ok]
    if bad:
        # Nothing is printed to stdout when anything is invalid, so `| kubectl apply -f -` applies nothing.
        for item in bad:
            for issue in item.issues:
                print(f"{item.label}: {issue}", file=sys.stderr)
        count = sum(len(i.issues) for i in bad)
        print(f"error: {count} problem(s) in {len(bad)} of {len(loaded)} manifest(s)", file=sys.stderr)
        return EXIT_INVALID
    if args.output == "json":
        data = [_plan_dict(item) for item in loaded]
        json.dump(data[0] if len(data) == 1 else data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.output == "yaml":
        _yaml_stream(loaded, args.image, sys.stdout)
    else:
        _table(loaded, sys.stdout)
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from finetune_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
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
    plan.set_defaults(func=cmd_plan)

    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    crd.set_defaults(func=cmd_crd)

    sub.add_parser("run", help="run a FineTuneJob on this machine: finetune run FILE --local [...]", add_help=False)
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
