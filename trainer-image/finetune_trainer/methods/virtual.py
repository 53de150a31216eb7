"""What prefix and prompt tuning share: peft prompt learning on a frozen base.

The trainable state is peft's prompt encoder (the virtual tokens, and for prefix tuning with projection
its MLP). `save_pretrained` writes the adapter in its inference form (for prefix projection: only the
projected prefix, not the MLP), which reloads with `PeftModel.from_pretrained` but cannot continue
training. So each checkpoint also holds the prompt encoder's whole state (`ENCODER_FILE`), and a resumed
run builds the same fresh peft model and loads that state into it: training continues exactly.

The base evaluation runs under `disable_adapter()`: randomly initialized virtual tokens already change the
output at step 0 (unlike LoRA, whose adapters start at zero).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from finetune_trainer.errors import ConfigError

#: The prompt encoder's full training state in a checkpoint's model/ directory.
ENCODER_FILE = "prompt_encoder.safetensors"

USAGE = ("`model/` is a peft adapter: load the base model, then the adapter on it; peft prepends the learned "
         "virtual tokens at every call. It cannot be merged into the weights, so serve it with peft.")


def _encoder(model: Any) -> Any:
    return model.prompt_encoder[model.active_adapter]


def save_state(model: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in _encoder(model).state_dict().items()}
    save_file(state, str(directory / ENCODER_FILE))


def wrap(model: Any, peft_config: Any, adapter_dir: Path | None) -> Any:
    """`model` with fresh virtual tokens, or the ones a checkpoint in `adapter_dir` trained."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config)
    if adapter_dir is not None:
        from safetensors.torch import load_file

        path = adapter_dir / ENCODER_FILE
        if not path.is_file():
            raise ConfigError(f"checkpoint {adapter_dir.parent.name} has no {ENCODER_FILE}: it was not written by "
                              f"a {peft_config.peft_type.value.lower()} run of this trainer", reason="InvalidCheckpoint")
        encoder = _encoder(peft_model)
        state = load_file(str(path), device=str(next(encoder.parameters()).device))
        encoder.load_state_dict(state)
    return peft_model


def as_base(model: Any) -> AbstractContextManager[Any]:
    return model.disable_adapter()
