"""What the run's collaborators read of it: `RunContext`, a Protocol (no code, no imports at run time).

`assess`, `artifacts`, `export`, `charts` and `tracking` take the run to read its config, inputs, model and
store. They name it through this Protocol, imported under TYPE_CHECKING only, instead of `train.Run`: so
nothing but the entrypoint (and tests) imports `train`, and `train` may import them all without a circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import ExportCheck, FineTuneJobSpec, Hyperparameters
    from finetune_trainer.checkpoint import TrainState
    from finetune_trainer.inputs import Inputs
    from finetune_trainer.methods.base import TrainingMethod
    from finetune_trainer.modeling import Precision, StartingModel
    from finetune_trainer.objectives.base import Objective
    from finetune_trainer.report import Reporter
    from finetune_trainer.storage import Store


class RunContext(Protocol):
    """A training run as its collaborators see it (`train.Run` is the one implementation)."""

    #: The config as given, and the one training runs with (the memory rung's micro-batch and accumulation).
    requested: TrainerConfig
    config: TrainerConfig
    spec: FineTuneJobSpec
    hp: Hyperparameters
    method: TrainingMethod
    objective: Objective
    output_uri: str
    store: Store
    work: Path
    started_at: str
    metrics_path: Path
    model_dir: Path
    #: What the run started from: the base model and a chained stage's merged adapters (provenance).
    start: StartingModel
    tokenizer: Any
    inputs: Inputs
    accelerator: Any
    precision: Precision
    fsdp: bool
    world: int
    #: The model as trained (wrapped by accelerate); None once released.
    model: Any
    state: TrainState
    reporter: Reporter
    tracker: Any
    export_check: ExportCheck | None

    def gpu_hours(self) -> float:
        """GPU-hours used by every attempt so far."""

    def _release(self) -> None:
        """Drop the model and optimizer (the export check reloads the saved model in their place)."""

    def _agreed(self, wanted: bool) -> bool:
        """True on every rank when it is true on any."""
