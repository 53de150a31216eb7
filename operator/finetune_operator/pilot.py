"""The pilot stage of `spec.pilot`: the short LoRA run derived from a FineTuneJob. Pure.

A FineTuneJob with `spec.pilot` (methods full, prefix and prompt; the spec refuses it elsewhere) runs in two
stages. The pilot is the same job as a LoRA run:

- method `lora` with `spec.lora` (its defaults unless set); no quantization, prefix or prompt block;
- bounded: `hyperparameters.maxSteps = pilot.maxSteps` (100 when neither bound is set), or
  `hyperparameters.epochs = pilot.dataFraction` (a share of one pass over the data, maxSteps unset);
- learning rate `pilot.learningRate`, else the LoRA default (2e-4), never the main run's;
- output under `<output.uri>/pilot/` (checkpoints, the adapter in `model/`, report, evaluation), no merge;
- `evaluation.gates = pilot.gates`: the trainer checks them after its evaluation, as it does for any run,
  and exits with the gates code (4) when one is missed, which fails the pilot's Job at once;
- its own plan (`sizing.plan` of the derived spec: LoRA on the same base model); explicit `spec.resources`
  GPU counts and sizes belong to the main run, so only placement (node selector, tolerations, priority
  class, GPU resource name, GPUs per node) is kept.

Its children (`render.render_children(..., stage=STAGE)`) are `<name>-pilot-config`, `<name>-pilot`
(Service and Job), labelled `finetune.dev/stage: pilot`. The main stage is created only after the pilot's
Job completed.
"""

from __future__ import annotations

from finetune_operator import sizing
from finetune_operator.spec import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_PILOT_MAX_STEPS,
    FineTuneJob,
    FineTuneJobSpec,
    Plan,
)

#: The stage name in labels, child names and `TrainerConfig.stage`.
STAGE = "pilot"
#: Where the pilot writes, relative to spec.output.uri.
OUTPUT_DIR = "pilot/"


def output_uri(main_output: str) -> str:
    """`s3://bucket/run/` -> `s3://bucket/run/pilot/`."""
    return main_output.rstrip("/") + "/" + OUTPUT_DIR


def pilot_spec(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    """The spec of the pilot run (see the module docstring). `spec.pilot` must be set."""
    pilot = spec.pilot
    if pilot is None:
        raise ValueError("the spec has no pilot")
    derived = spec.model_copy(deep=True)
    derived.method = "lora"
    derived.quantization = None
    derived.prefix = None
    derived.prompt = None
    derived.pilot = None
    derived.serving = None  # the pilot's adapter is a means to the main run, never served
    hp = derived.hyperparameters
    if pilot.data_fraction is not None:
        hp.epochs = pilot.data_fraction
        hp.max_steps = None
    else:
        hp.max_steps = pilot.max_steps or DEFAULT_PILOT_MAX_STEPS
    hp.learning_rate = pilot.learning_rate or DEFAULT_LEARNING_RATE["lora"]
    derived.output.uri = output_uri(spec.output.uri)
    derived.output.save_merged = False
    derived.evaluation.gates = [gate.model_copy() for gate in pilot.gates]
    derived.resources.gpus = None
    derived.resources.gpu_memory = None
    derived.resources.cpu = None
    derived.resources.memory = None
    return derived


def pilot_job(job: FineTuneJob) -> FineTuneJob:
    """The FineTuneJob as its pilot stage: the same metadata, the pilot's spec."""
    return job.model_copy(update={"spec": pilot_spec(job.spec)})


def plan(job: FineTuneJob) -> Plan:
    """The pilot's sizing plan (raises `sizing.PlanningError` like the main plan)."""
    return sizing.plan(pilot_spec(job.spec))
