"""Packed rows (`dataset.pack`, `collate`) do not attend across examples, and train on the same loss as unpacked.

A packed row carries `position_ids` restarting at 0 at every example and no attention mask; transformers
then builds a block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`,
with `use_cache=False`). Checked on the tiny model with both attention implementations the trainer uses on
CPU (`modeling.attention_implementation`: eager for short rows, SDPA otherwise):

- changing one example's tokens leaves the logits of the other examples in its row unchanged (and, as a
  control that the check can fail, does change them when the same row is given one running position range);
- the packed batch's summed token loss and its gradients equal the same examples' run unpacked, through the
  selective loss and through the fused loss (`fused_loss`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

ATTENTION = ["sdpa", "eager"]


def _examples(model_dir: Path, sample: Any, count: int = 6) -> list[Any]:
    from transformers import AutoTokenizer

    from finetune_trainer import dataset as ds

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in sample.train.read_text().splitlines()[:2 * count]]
    # Lengths 40, 56, 72, ... tokens (truncated): rows of several examples and padded tails.
    encoded = [e for e in (ds.encode(r, "instruction", tokenizer, 40 + 16 * i) for i, r in enumerate(rows))
               if e is not None]
    return encoded[:count]


def _model(model_dir: Path, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    model.train()  # training mode, as the loop runs it (the tiny Llama has no dropout)
    return model


def _segments(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row, from its position ids."""
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(itertools.pairwise(starts))


@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_examples_do_not_attend_to_each_other(attention: str, tiny_model_dir: Path,
                                                     healthcare_sample: Any) -> None:
    import torch

    from finetune_trainer import dataset as ds

    examples = _examples(tiny_model_dir, healthcare_sample, 3)
    (row,) = ds.pack(examples, max_length=10_000, seed=0)  # all three in one row
    spans = _segments(row.position_ids)
    assert len(spans) == 3
    batch = ds.collate([row], 0)
    assert "attention_mask" not in batch
    model = _model(tiny_model_dir, attention)
    first, rest = spans[0], slice(spans[1][0], None)
    changed = batch["input_ids"].clone()
    changed[0, first[0] + 1:first[1]] = torch.randint(10, 500, (first[1] - first[0] - 1,),
                                                      generator=torch.Generator().manual_seed(0))
    assert not torch.equal(changed, batch["input_ids"])

    def logits(ids: Any, positions: Any) -> Any:
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]

    before, after = logits(batch["input_ids"], batch["position_ids"]), logits(changed, batch["position_ids"])
    assert not torch.allclose(before[first[0] + 1:first[1]], after[first[0] + 1:first[1]])  # it did change
    torch.testing.assert_close(after[rest], before[rest], rtol=0, atol=1e-6)
    # Control: one running position range makes the row one sequence, and then the first example's tokens
    # do reach the others' logits (what the check above would see if packing attended across examples).
    running = torch.arange(batch["input_ids"].shape[1])[None]
    assert not torch.allclose(logits(changed, running)[rest], logits(batch["input_ids"], running)[rest], atol=1e-4)


def _loss_and_grads(model: Any, batches: list[Any], fused: bool) -> tuple[float, dict[str, Any]]:
    """Summed token loss of `batches` (num_items 1) and its gradients."""
    import torch

    from finetune_trainer.objectives.sft import step_loss

    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in batches:
        loss = step_loss(model, batch, "cpu", 1.0, True, fused)
        loss.backward()
        total += loss.detach()
    return float(total), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("fused", [False, True], ids=["selective", "fused"])
def test_packed_loss_equals_the_unpacked_loss(attention: str, fused: bool, tiny_model_dir: Path,
                                              healthcare_sample: Any) -> None:
    """Six examples packed into rows of at most 160 tokens (several examples per row, a padded tail) train on
    the same summed loss, with the same gradients, as the six run one by one unpacked (float32: within 1e-5
    relative; each gradient within 1e-5 of its largest element)."""
    from finetune_trainer import dataset as ds

    examples = _examples(tiny_model_dir, healthcare_sample)
    rows = ds.pack(examples, max_length=160, seed=1)
    assert len(rows) < len(examples) and any(len(_segments(r.position_ids)) > 1 for r in rows)
    packed = [ds.collate(rows[i:i + 2], 0) for i in range(0, len(rows), 2)]
    assert any(len(r.input_ids) < b["input_ids"].shape[1] for b, i in zip(packed, range(0, len(rows), 2), strict=True)
               for r in rows[i:i + 2])  # a padded tail: a segment of its own with ignored labels
    model = _model(tiny_model_dir, attention)
    packed_loss, packed_grads = _loss_and_grads(model, packed, fused)
    alone_loss, alone_grads = _loss_and_grads(model, [ds.collate([e], 0) for e in examples], fused)
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in alone_grads.items():
        assert float((packed_grads[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()), name
