"""What prefix and prompt tuning share: peft prompt learning on a frozen base.

The trainable state is peft's prompt encoder (the virtual tokens, and for prefix tuning with projection
its MLP). `save_pretrained` writes the adapter in its inference form (for prefix projection: only the
projected prefix, not the MLP), which reloads with `PeftModel.from_pretrained` but cannot continue
training. So each checkpoint also holds the prompt encoder's whole state (`ENCODER_FILE`), and a resumed
run builds the same fresh peft model and loads that state into it: training continues exactly.

The base evaluation runs under `as_base` (peft's `disable_adapter()`): randomly initialized virtual tokens
already change the output at step 0 (unlike LoRA, whose adapters start at zero).

Generation: peft's own `generate` is wrong for both methods with the pinned peft 0.21.2 and transformers
5.24 (transformers renamed the cache argument to `cache`; peft injects the prefix as `past_key_values`,
which the model then ignores, and re-inserts prompt-tuning tokens at every decoding step). Measured on the
tiny model: prefix tuning generated exactly the base model's tokens, prompt tuning diverged from greedy
decoding after the first token. So `wrap` gives the model this module's `generate`: greedy decoding with a
KV cache that feeds the virtual tokens once, at the positions training gave them (0..n-1, the text from
n), and left padding handled by position ids (tests/trainer/test_peft_methods.py checks it against
decoding by full forward passes).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune_trainer.errors import ConfigError

#: The prompt encoder's full training state in a checkpoint's model/ directory.
ENCODER_FILE = "prompt_encoder.safetensors"

USAGE = ("`model/` is a peft adapter: load the base model, then the adapter on it; peft prepends the learned "
         "virtual tokens at every call. It cannot be merged into the weights, so serve it with peft. With peft "
         "0.21 and transformers 5.24, peft's `generate` ignores a prefix and repeats prompt-tuning tokens at every "
         "step: decode with `finetune_trainer.methods.virtual.generate(model, **inputs)` (greedy, what the "
         "evaluation used) or by forward passes until peft is fixed.")


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
    return use_own_generate(peft_model)


#: Set on the model while `as_base` switches the virtual tokens off.
_OFF = "_finetune_virtual_tokens_off"


@contextmanager
def as_base(model: Any) -> Iterator[Any]:
    with model.disable_adapter():
        setattr(model, _OFF, True)
        try:
            yield model
        finally:
            delattr(model, _OFF)


def use_own_generate(model: Any) -> Any:
    """Give a peft prompt-learning model this module's `generate` (see the module docstring)."""
    model.generate = functools.partial(generate, model)
    return model


def _cache_argument(base: Any) -> str:
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def generate(model: Any, input_ids: Any, attention_mask: Any | None = None, generation_config: Any = None,
             max_new_tokens: int | None = None, **kwargs: Any) -> Any:
    """Greedy decoding with the virtual tokens of a peft prefix- or prompt-tuning `model`: prompt ids (left
    padded, with their attention mask) followed by the new tokens, as `model.generate` returns them."""
    import torch
    from peft import PeftType

    base = model.get_base_model()
    config = generation_config if generation_config is not None else base.generation_config
    steps = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
    if getattr(model, _OFF, False):  # the base evaluation: the base model, as it generates by itself
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)
    eos = config.eos_token_id
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos], device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0].item() if len(eos_ids) else 0)
    peft_config = model.active_peft_config
    n, batch = peft_config.num_virtual_tokens, input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    # Training positions: the virtual tokens 0..n-1 (prompt) or the cache's n slots (prefix), the text from n.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + n
    cache_arg = _cache_argument(base)
    with torch.no_grad():
        if peft_config.peft_type == PeftType.PREFIX_TUNING:
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       **{cache_arg: model.get_prompt(batch)}, use_cache=True)
        else:
            embeds = model.word_embeddings(input_ids)
            prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
            virtual = torch.arange(n, device=input_ids.device).expand(batch, n)
            out = base(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask,
                       position_ids=torch.cat([virtual, positions], dim=1), use_cache=True)
        new: list[Any] = []
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        position = positions[:, -1:]
        for step in range(steps):
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            new.append(token)
            done |= torch.isin(token, eos_ids)
            if bool(done.all()) or step == steps - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = position + 1
            cache = getattr(out, "cache", None) or out.past_key_values
            out = base(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       **{cache_arg: cache}, use_cache=True)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids
