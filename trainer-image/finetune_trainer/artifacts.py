"""Final artifacts under `<output.uri>`, the output's completion marker, and provenance.

    model/            adapter (lora, qlora, prefix, prompt) or full weights (full), plus the tokenizer
    merged/           base + adapter merged into one model (spec.output.saveMerged; lora and qlora: the
                      spec refuses it for prefix and prompt, whose virtual tokens are not weights), merged
                      shard by shard (merge.py) and checked against the adapter (export.py)
    metrics.jsonl     one line per step: step, epoch, loss, learning_rate, tokens; at logging steps also
                      tokens_per_second (non-padding tokens) and window_loss; at checkpoints eval_loss
    evaluation.json   base vs fine-tuned scores (EvaluationStatus)
    loss.png          the loss curve (train and eval loss over steps, the pilot's too) and the base vs
    evaluation.png    fine-tuned scores (evaluation enabled), which the model card embeds (charts.py)
    provenance.json   data files with sha256, data stats, base model files with sha256, config, image, world;
                      with spec.retrieval the corpus files with sha256 and the index settings (`retrieval`)
    tensorboard/      TensorBoard event files of every attempt (loss, eval_loss, learning_rate, tokens_per_second,
                      gpu_hours), also uploaded at each checkpoint (tracking.py)
    retrieval/        spec.retrieval: the BM25 index (`index/`), `passages.jsonl`, `retriever.json` (settings,
                      prompt layout, corpus sha256): what a serving stack loads (`retrieval.Retriever.load`)
    serving/          spec.serving: llminferenceservice.yaml (KServe) and vllm.yaml (vLLM Deployment + Service),
                      rendered by finetune_operator.serving (not for the pilot stage)
    README.md         model card
    _COMPLETE         written last (a manifest of every file above with sizes and sha256)

The marker is not written when gates fail or the export check fails (export.py: the saved adapter
reloaded on the base, and merged/, against the trained model's logits): the files are there to inspect, but
the output is not complete. For qlora the merge goes into the 16-bit base on disk (merging into 4-bit weights
would round the adapter away), on the CPU, one shard at a time, so it never competes with the training model
for GPU memory.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.contract import MARKER_NAME

if TYPE_CHECKING:
    from finetune_trainer.runtypes import RunContext as Run

log = logging.getLogger(__name__)

PROVENANCE_KEY = "provenance.json"


def _provenance(run: Run) -> dict[str, Any]:
    from finetune_trainer import provenance

    return provenance.build_provenance(
        run.config,
        data_files=[path for path, _ in run.inputs.files],
        data_uris=[uri for _, uri in run.inputs.files],
        base_model_uri=run.spec.base_model.resolved_uri(),
        base_model_revision=run.spec.base_model.revision,
        base_model_files_sha256=run.start.base_files,
        merged_adapters=run.start.adapter_records(),
        image=run.config.image,
        seed=run.hp.seed,
        world_size=run.world,
        started_at=run.started_at,
        data_stats=run.inputs.stats().wire(),
        retrieval=_retrieval_provenance(run),
    )


def _retrieval_provenance(run: Run) -> dict[str, Any] | None:
    if run.inputs.retrieval is None or run.spec.retrieval is None:
        return None
    from finetune_trainer import retrieval

    return retrieval.provenance_record(run.inputs.retrieval, run.spec.retrieval)


def upload_provenance(run: Run) -> str:
    """Write provenance.json now (rank 0): with provenanceRequired this happens before training."""
    run.store.write_json(PROVENANCE_KEY, _provenance(run))
    uri = str(run.store.child(PROVENANCE_KEY))
    log.info("provenance recorded at %s", uri)
    return uri


def _save_model(run: Run, stage: Path) -> None:
    """model/ (+ tokenizer): collective under FSDP (the full state dict is gathered), rank 0 writes."""
    accelerator = run.accelerator
    state_dict = accelerator.get_state_dict(run.model) if run.fsdp else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        unwrapped.save_pretrained(str(stage / "model"), state_dict=state_dict, safe_serialization=True)
        run.tokenizer.save_pretrained(str(stage / "model"))
        if run.method.adapter:  # the served base's name, target modules as a list (export.py)
            from finetune_trainer import export

            export.finish_adapter_config(stage / "model", run.spec.served_base_model_name())


def publish(run: Run, evaluation: Any, final_loss: float | None, *, complete: bool) -> dict[str, str]:
    """Write every artifact (rank 0), then the marker when `complete`; returns their URIs by kind."""
    from finetune_trainer import world

    accelerator = run.accelerator
    # The group of the wait below, created (collectively) while every rank is still in step.
    world.publish_group()
    stage = run.work / "artifacts"
    if accelerator.is_main_process:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    _save_model(run, stage)
    uris: dict[str, str] = {}
    if accelerator.is_main_process:
        uris = _write_files(run, stage, evaluation, final_loss, complete)
    # Rank 0's merge, export check and upload can outlast the collective timeout (70B with saveMerged): the
    # others wait on a gloo group with FT_PUBLISH_TIMEOUT instead (world.ENV_PUBLISH_TIMEOUT).
    world.publish_barrier()
    return uris


def _write_files(run: Run, stage: Path, evaluation: Any, final_loss: float | None, complete: bool) -> dict[str, str]:
    from finetune_trainer import export, modelcard

    kinds = {"model": "model/", "metrics": "metrics.jsonl", "evaluation": "evaluation.json",
             "provenance": PROVENANCE_KEY, "modelCard": "README.md"}
    merged = None
    if run.spec.output.save_merged:
        if not run.method.mergeable:
            log.warning("spec.output.saveMerged has no effect with method %s: %s", run.config.method,
                        "model/ is the whole model" if not run.method.adapter else "there is nothing to merge")
        else:
            merged = export.save_merged(run, stage)  # streaming, shard by shard (merge.py)
            kinds["merged"] = "merged/"
    check = export.check(run, stage, merged)  # reload and merge vs the trained model's logits (report.export)
    complete = complete and (check is None or bool(check.passed))
    if run.inputs.retrieval is not None:
        run.inputs.retrieval.retriever.save(stage / "retrieval")
        kinds["retrieval"] = "retrieval/"
    if run.tracker.stage_tensorboard(stage):  # every attempt's event files (tracking.py)
        kinds["tensorboard"] = "tensorboard/"
    if run.metrics_path.is_file():
        shutil.copy(run.metrics_path, stage / "metrics.jsonl")
    else:
        (stage / "metrics.jsonl").write_text("")
    (stage / "evaluation.json").write_text(
        json.dumps(evaluation.model_dump(by_alias=True, exclude_none=True, mode="json"), indent=2, sort_keys=True) + "\n")
    (stage / PROVENANCE_KEY).write_text(json.dumps(_provenance(run), indent=2, sort_keys=True) + "\n")
    from finetune_trainer import serving_manifests  # serving/*.yaml with spec.serving (not for the pilot)

    kinds.update(serving_manifests.write(run.config, stage))
    # loss.png, evaluation.png (kinds lossChart, evaluationChart), before the card, which links them
    from finetune_trainer import charts

    kinds.update(charts.write_for_run(run, stage, evaluation))
    uris = {kind: str(run.store.child(key.rstrip("/"))) + ("/" if key.endswith("/") else "")
            for kind, key in kinds.items()}
    summary = {"final_loss": final_loss, "steps": run.state.step, "world_size": run.world,
               "train_examples": run.inputs.train_examples, "skipped_rows": run.inputs.skipped_rows,
               "validation_examples": len(run.inputs.validation), "examples_truncated": run.inputs.truncated,
               "examples_truncated_away": run.inputs.truncated_away}
    if run.spec.objective != "sft":  # dpo: the examples above are preference pairs
        summary["objective"] = run.spec.objective
    (stage / "README.md").write_text(
        modelcard.render_model_card(run.config, evaluation=evaluation, artifacts=uris, metrics_summary=summary,
                                    export=check))
    run.store.upload_dir(stage, "", marker=complete)
    if complete:
        log.info("artifacts complete: %s", run.store.child(MARKER_NAME))
    return uris
