"""Chained stages (`spec.baseModel.fromJob`): what a job starts from, given the base job it names. Pure.

A chained job starts from its base job's result:

- the base job's `merged/` when it saved one (spec.output.saveMerged), or its `model/` for method full (the
  whole model): the model to load, no adapter to merge;
- else the base job's own starting model (its `spec.baseModel.uri`, or for a base job that is itself chained,
  the model it started from) with the adapters it started from and then its own adapter (`model/`) merged in,
  in order, before this job's method is applied. The trainer merges them into the 16-bit weights on disk
  (`merge.py`), so a QLoRA stage quantizes the merged model, never merges into 4-bit weights.

Prefix and prompt tuning results cannot be chained: virtual tokens are not weights (`BaseUnchainable`).
"""

from __future__ import annotations

from finetune_operator.spec import (
    VIRTUAL_TOKEN_METHODS,
    BaseJobStatus,
    ChainStage,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

#: Most stages a chain may have (status.baseJob.chain, provenance): a guard against cycles too.
MAX_CHAIN = 16


class BaseUnchainable(ValueError):
    """The base job's result cannot be started from (virtual tokens, no model artifact, a cycle)."""


def resolve(base: FineTuneJob, status: FineTuneJobStatus, *, uid: str | None = None) -> BaseJobStatus:
    """Where a job chained to `base` (which Succeeded with `status`) starts from."""
    name = base.metadata.name
    method = status.plan.method if status.plan is not None else base.spec.method
    if method in VIRTUAL_TOKEN_METHODS:
        raise BaseUnchainable(f"base job {name} trained with method {method}: its virtual tokens are not weights and "
                              "cannot be merged into a model to start from; chain to a lora, qlora or full job")
    model = status.artifacts.get("model")
    if not model:
        output = base.spec.output.uri
        if not output.startswith("s3://"):
            # The operator reads a job's report, and so its artifacts, only from S3; and it mounts no other job's
            # claim into this one's pods.
            raise BaseUnchainable(f"base job {name} writes its result to {output}: a chained stage starts from a "
                                  "base job's result in S3; give the base job an s3:// spec.output.uri")
        raise BaseUnchainable(f"base job {name} Succeeded but reports no model artifact (status.artifacts.model)")
    earlier = status.base_job
    chain = [*(earlier.chain if earlier is not None else []),
             ChainStage(name=name, namespace=base.metadata.namespace, uid=uid, objective=base.spec.objective,
                        method=method, output_uri=base.spec.output.uri)]
    if len(chain) > MAX_CHAIN:
        raise BaseUnchainable(f"the chain ending at {name} has {len(chain)} stages, more than {MAX_CHAIN}")
    if any(stage.name == chain[-1].name and stage.uid == uid for stage in chain[:-1]):
        raise BaseUnchainable(f"the chain through {name} is a cycle")
    parameters = _parameters(base, status)
    merged = status.artifacts.get("merged")
    if method == "full" or merged:
        return BaseJobStatus(name=name, uid=uid, phase="Succeeded", model_uri=merged or model, adapters=[],
                             parameters=parameters, chain=chain)
    if earlier is not None:  # the base job was itself chained: it started from earlier.model_uri + adapters
        start, revision, adapters = earlier.model_uri, earlier.revision, list(earlier.adapters)
        secret = base.spec.base_model.secret_ref or earlier.secret_ref
    else:
        start, revision, adapters = base.spec.base_model.uri, base.spec.base_model.revision, []
        secret = base.spec.base_model.secret_ref
    if start is None:
        raise BaseUnchainable(f"base job {name} has no resolved base model (status.baseJob.modelUri)")
    return BaseJobStatus(name=name, uid=uid, phase="Succeeded", model_uri=start, revision=revision, secret_ref=secret,
                         adapters=[*adapters, model], parameters=parameters, chain=chain)


def _parameters(base: FineTuneJob, status: FineTuneJobStatus) -> int | None:
    # The size the base job was planned with first (its explicit parameters or its model name, e.g. 7B), so a
    # chained stage of a table model plans from the same table row; the pre-flight's exact count (6.74B) only
    # where the base job had no size of its own.
    billions = base.spec.base_model.parameters_billion()
    if billions is not None:
        return round(billions * 1e9)
    if status.base_job is not None and status.base_job.parameters:
        return status.base_job.parameters
    if status.preflight is not None and status.preflight.parameters:
        return status.preflight.parameters
    return None


def apply(spec: FineTuneJobSpec, resolved: BaseJobStatus) -> FineTuneJobSpec:
    """`spec` with its baseModel pointing at what the chain resolved to: uri set, fromJob cleared (the chain is in
    `TrainerConfig.base` and provenance), parameters from the base job when the spec does not give them."""
    base_model = spec.base_model.model_copy(update={
        "uri": resolved.model_uri, "from_job": None, "revision": resolved.revision,
        # The model the base job started from may need that job's Secret (a gated hub model's token).
        "secret_ref": spec.base_model.secret_ref or resolved.secret_ref,
        "parameters": spec.base_model.parameters or (_param_text(resolved.parameters) if resolved.parameters else None),
    })
    return spec.model_copy(update={"base_model": base_model})


def _param_text(count: int) -> str:
    """A parameter count as spec.baseModel.parameters spells it (`1.1B`, `350M`), exact to 3 significant digits."""
    if count >= 1e9:
        return f"{count / 1e9:.3g}B"
    return f"{count / 1e6:.3g}M"
