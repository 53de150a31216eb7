"""Training methods, one module each, as torchtune keeps one recipe per method.

Each module (`full`, `lora`, `qlora`, `prefix`, `prompt`) defines one `TrainingMethod` named `METHOD`: how
the base model is loaded for it and how the loaded model becomes what the method trains (and resumes),
plus the few facts the rest of the trainer asks about (whether `model/` is a peft adapter, whether it can
be merged, the model card's settings rows, how the trained model computes as the base for the base
evaluation, extra files a checkpoint needs). `REGISTRY` maps the spec's resolved method name to it;
`modeling.load_base` and `modeling.prepare_for_training` dispatch through it.

Adding a method: a module here with its `METHOD`, one line in `REGISTRY`, and the method's spec block
(`finetune_operator.spec`) and memory model (`finetune_operator.sizing`).
"""

from __future__ import annotations

from finetune_trainer.methods import full, lora, prefix, prompt, qlora
from finetune_trainer.methods.base import TrainingMethod

REGISTRY: dict[str, TrainingMethod] = {m.name: m for m in (full.METHOD, lora.METHOD, qlora.METHOD, prefix.METHOD,
                                                           prompt.METHOD)}


def get(name: str) -> TrainingMethod:
    """The method registered as `name` (a resolved spec method)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no training method {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "TrainingMethod", "get"]
