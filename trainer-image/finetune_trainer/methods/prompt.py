"""`prompt`: prompt tuning (peft `PromptTuningConfig`). `spec.prompt.virtualTokens` trainable embeddings
are prepended to every input; the base is frozen in the training precision. `init: text` starts them from
the token embeddings of `initText` (peft `PromptTuningInit.TEXT`, with the base model's own tokenizer).

Limits, refused by the spec (finetune_operator.spec): no packing (peft drops position ids, so examples of a
packed row would attend to each other), nothing to merge. Gradient checkpointing works (the virtual
tokens are inputs of the first layer). Several GPUs or nodes: data-parallel (DDP), like LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.methods import virtual
from finetune_trainer.methods.base import TrainingMethod, enable_checkpointing, frozen_base_kwargs

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import FineTuneJobSpec


def peft_config(config: TrainerConfig, tokenizer_dir: str) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    prompt = config.spec.resolved_prompt()
    if prompt.init == "text":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=prompt.init_text,
                                  tokenizer_name_or_path=tokenizer_dir)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def prepare(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    enable_checkpointing(model, config)
    # The base model's directory holds its tokenizer (modeling.load_tokenizer reads it from there too).
    return virtual.wrap(model, peft_config(config, str(model.name_or_path)), adapter_dir)


def card_rows(spec: FineTuneJobSpec) -> list[tuple[str, Any]]:
    prompt = spec.resolved_prompt()
    rows: list[tuple[str, Any]] = [("virtual tokens", prompt.virtual_tokens), ("initialization", prompt.init)]
    if prompt.init_text is not None:
        rows.append(("initialization text", prompt.init_text))
    return rows


METHOD = TrainingMethod(
    name="prompt",
    title="prompt tuning",
    adapter=True,
    mergeable=False,
    load_kwargs=frozen_base_kwargs,
    prepare=prepare,
    card_rows=card_rows,
    as_base=virtual.as_base,
    save_state=virtual.save_state,
    usage_note=virtual.USAGE,
    selective_logits=False,
)
