"""`dpo`: Direct Preference Optimization on preference pairs (a prompt, a chosen and a rejected response).

The loss compares how much more likely the policy makes the chosen response than the reference does with the
same margin for the rejected one. With `pc`, `pr` the policy's and `rc`, `rr` the reference's log-probabilities
of the chosen and rejected response (each the sum over the response tokens of the log-softmax of that token):

- `sigmoid` (DPO): `-logsigmoid(beta * ((pc - rc) - (pr - rr)))`
- `ipo` (IPO): `((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2`, the log-ratios averaged over the
  response's tokens (`nc`, `nr`) as TRL's `ipo` does (the IPO authors' normalized form)

averaged over the pairs of an optimizer step. This is TRL 1.16's `DPOTrainer` with its defaults
(`f_divergence_type="reverse_kl"`, no `ld_alpha`, no WPO weighting; `label_smoothing` does not enter either
loss); `tests/trainer/test_dpo_objective.py` checks loss and log-probabilities against it. The implicit
rewards are `beta * (policy - reference)` per response (summed log-probabilities, also for ipo, as TRL logs
them); preference accuracy is the share of pairs whose chosen reward is strictly above the rejected one
(a tie, e.g. every pair before training when policy and reference are the same weights, counts as wrong),
the margin the mean of chosen minus rejected reward. `reference_free` takes the reference log-probabilities
as 0 (the loss then only asks the policy to prefer chosen over rejected).

Batch layout: one forward over 2B rows, the B chosen sequences (prompt + chosen) then the B rejected ones
(prompt + rejected), right-padded to the longest, with labels -100 on the prompt and the padding: the loss is
on response tokens only. Pairs are never packed: the two sequences of a pair share their prompt and are
compared with each other, and a row holding several examples would need a per-example sum of log-probabilities
across segment boundaries for no gain (pairs of one step are grouped by length, so padding stays small).

The reference costs no second copy of the weights: for LoRA and QLoRA it is the same model with its adapter
switched off (peft's `disable_adapter()`) under `no_grad`; for full fine-tuning its log-probabilities are
computed once before training (`precompute_reference`, the model in eval mode) and read by pair id
(`PrecomputedReference`); `save_reference`/`load_reference` store them with the checkpoints, keyed by a
fingerprint of the pairs' token ids, so a resumed run reads them instead of recomputing them from weights
that have since moved.

Nothing here imports trl: TRL is the peer the tests compare with, not a dependency of the trainer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.objectives.base import StepLoss

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # dataset.IGNORE_INDEX; repeated so this module does not import dataset (and its deps)
LOSSES = ("sigmoid", "ipo")
Loss = Literal["sigmoid", "ipo"]
#: Format tag in a stored reference file; bump when its layout changes.
REFERENCE_FORMAT = "finetune-dpo-reference/1"
REFERENCE_FILE = "reference_logps.safetensors"


# ------------------------------------------------------------------------------------------------
# Items and batches
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairEncoded:
    """One tokenized preference pair: the prompt's ids, then each response's ids (response tokens only,
    EOS included by the encoder). The chosen sequence is prompt + chosen, the rejected one prompt + rejected."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def pair_length(pair: PairEncoded) -> int:
    """The row width the pair needs (both of its rows are padded to the batch's widest)."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def collate_pairs(pairs: Sequence[PairEncoded], pad_id: int,
                  pair_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """One padded batch of 2B rows: the chosen sequences, then the rejected ones, in the order of `pairs`.

    `labels` are the input ids on response tokens and IGNORE_INDEX on the prompt and padding (the first label
    too: nothing predicts it); `position_ids` count from 0 in every row; `pair_ids` (default 0..B-1) say
    which pair of the split each is, for a precomputed reference; `num_tokens` counts the real tokens."""
    import torch

    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids, labels, mask = [], [], []
    for prompt, response in rows:
        ids = list(prompt) + list(response)
        pad = width - len(ids)
        row_labels = [IGNORE_INDEX] * len(prompt) + list(response) + [IGNORE_INDEX] * pad
        if row_labels:
            row_labels[0] = IGNORE_INDEX
        input_ids.append(ids + [pad_id] * pad)
        labels.append(row_labels)
        mask.append([1] * len(ids) + [0] * pad)
    ids_of_pairs = list(range(len(pairs))) if pair_ids is None else list(pair_ids)
    if len(ids_of_pairs) != len(pairs):
        raise ValueError(f"{len(ids_of_pairs)} pair ids for {len(pairs)} pairs")
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        # 0..width-1 in every row: what the model derives itself for right padding, given explicitly so every
        # objective's batch carries the same keys.
        "position_ids": torch.arange(width, dtype=torch.long).expand(len(rows), width).clone(),
        "pair_ids": torch.tensor(ids_of_pairs, dtype=torch.long),
        "num_tokens": sum(len(p) + len(r) for p, r in rows),
    }


# ------------------------------------------------------------------------------------------------
# Log-probabilities
# ------------------------------------------------------------------------------------------------


def sequence_logps(model: Any, batch: dict[str, Any], device: Any,
                   selective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch (2B rows): the summed log-probability of its supervised tokens, and their count.

    Log-softmax in float32 of the logits at the positions that predict a label. `selective`: the logits are
    computed only at the columns where some row's next token is a label (transformers' `logits_to_keep` with
    their indices, as `objectives.sft.step_loss` does), not for the prompt and padding columns of every row. The
    forward goes through `model` as given (DDP, peft), with gradients when the caller has them on."""
    import torch

    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = batch["labels"].to(device)[:, 1:]  # position p predicts token p + 1
    if selective:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=targets.device)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        targets = targets[:, keep]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    supervised = targets != IGNORE_INDEX
    logits = logits.float()
    # gather - logsumexp: the log-softmax of the label token, without a second vocabulary-wide tensor.
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked.masked_fill(~supervised, 0.0).sum(dim=1), supervised.sum(dim=1)


@dataclass
class PairLogps:
    """Per pair (B each): summed log-probabilities of the chosen and rejected responses, and their lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logps(model: Any, batch: dict[str, Any], device: Any, selective: bool = True) -> PairLogps:
    """The policy's (or whatever `model` computes now) per-pair log-probabilities from one forward of 2B rows."""
    logps, counts = sequence_logps(model, batch, device, selective)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------


def _peft_model(model: Any) -> Any:
    """The peft model inside a DDP/accelerate wrapper (or `model` itself)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "disable_adapter"):
        raise ConfigError("objective dpo with an adapter reference needs a peft model (method lora or qlora); "
                          "for method full the reference log-probabilities are precomputed "
                          "(spec.dpo.precomputeReference)", reason="InvalidConfig")
    return inner


class AdapterReference:
    """LoRA/QLoRA: the reference is the base, i.e. the same model with its adapter switched off."""

    def __init__(self, selective: bool = True):
        self.selective = selective

    def logps(self, model: Any, batch: dict[str, Any], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with torch.no_grad(), _peft_model(model).disable_adapter():
            logps, _ = sequence_logps(model, batch, device, self.selective)
        chosen, rejected = logps.chunk(2)
        return chosen, rejected


class PrecomputedReference:
    """Full fine-tuning: the reference's log-probabilities computed before training, read by pair id.

    `table` is (pairs, 2): column 0 the chosen, column 1 the rejected response's summed log-probability."""

    def __init__(self, table: torch.Tensor):
        if table.dim() != 2 or table.shape[1] != 2:
            raise ValueError(f"a reference table is (pairs, 2), got {tuple(table.shape)}")
        self.table = table

    def logps(self, model: Any, batch: dict[str, Any], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table[batch["pair_ids"]].to(device)
        return rows[:, 0], rows[:, 1]


class ZeroReference:
    """`referenceFree`: reference log-probabilities of 0."""

    def logps(self, model: Any, batch: dict[str, Any], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        zeros = torch.zeros(batch["pair_ids"].numel(), device=device)
        return zeros, zeros


Reference = AdapterReference | PrecomputedReference | ZeroReference


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def precompute_reference(model: Any, pairs: Sequence[PairEncoded], batch_size: int, pad_id: int, device: Any,
                         selective: bool = True) -> torch.Tensor:
    """The reference table (pairs, 2) of `model` as it is now, over all `pairs` in order: one pass in eval
    mode without gradients, before training. float32 on the CPU, as the loss reads it."""
    import torch

    out = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_pairs(chunk, pad_id)
            logps, _ = sequence_logps(model, batch, device, selective)
            chosen, rejected = logps.float().cpu().chunk(2)
            out.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(out) if out else torch.zeros((0, 2), dtype=torch.float32)


def pairs_fingerprint(pairs: Sequence[PairEncoded]) -> str:
    """sha256 of the pairs' token ids in order: a stored reference belongs to exactly these pairs."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def save_reference(path: Path, table: torch.Tensor, fingerprint: str) -> Path:
    """Write the reference table to `path` (a safetensors file) with the pairs' fingerprint; returns `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logps": table.detach().float().cpu().contiguous()}, str(path),
              metadata={"format": REFERENCE_FORMAT, "fingerprint": fingerprint, "pairs": str(table.shape[0])})
    return path


def load_reference(path: Path, fingerprint: str) -> torch.Tensor:
    """The reference table stored at `path`, checked against the fingerprint of the pairs it is for."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            table = fh.get_tensor("logps")
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise DataError(f"{path}: cannot read the stored DPO reference log-probabilities ({err}); they cannot be "
                        "recomputed from a trained checkpoint: start a new run (another output.uri)") from None
    if metadata.get("format") != REFERENCE_FORMAT:
        raise DataError(f"{path}: field format is {metadata.get('format')!r}, expected {REFERENCE_FORMAT!r}; "
                        "the file was written by another version: start a new run (another output.uri)")
    if metadata.get("fingerprint") != fingerprint:
        raise DataError(f"{path}: field fingerprint {metadata.get('fingerprint')!r} does not match the training "
                        f"pairs ({fingerprint!r}): the data or tokenizer changed since these reference "
                        "log-probabilities were computed; restore them, or start a new run (another output.uri)")
    return table


# ------------------------------------------------------------------------------------------------
# The loss and the preference metrics
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpoSettings:
    """`spec.dpo`: beta, the loss, and whether the reference is left out."""

    beta: float = 0.1
    loss: Loss = "sigmoid"
    reference_free: bool = False

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"spec.dpo.beta is {self.beta}; it must be above 0 (0.1 is usual)")
        if self.loss not in LOSSES:
            raise ConfigError(f"spec.dpo.loss is {self.loss!r}; one of {', '.join(LOSSES)}")


def dpo_losses(policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               settings: DpoSettings) -> torch.Tensor:
    """Per-pair losses (B), differentiable through the policy's log-probabilities.

    ipo's token counts are each response's predicted tokens (`PairLogps.*_tokens`): TRL's count of completion
    tokens whenever the prompt is not empty (with an empty prompt nothing predicts the first token)."""
    import torch.nn.functional as F

    chosen_ratio = policy.chosen - ref_chosen
    rejected_ratio = policy.rejected - ref_rejected
    if settings.loss == "sigmoid":
        return -F.logsigmoid(settings.beta * (chosen_ratio - rejected_ratio))
    # ipo: log-ratios averaged over each response's tokens (a length-independent beta)
    delta = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * settings.beta)) ** 2


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (policy - reference) log-probability of a response, detached: what DPO implicitly rewards."""
    return beta * (policy.detach() - reference.detach())


def preference_sums(chosen_rewards: torch.Tensor,
                    rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs with a positive margin, summed margin) as float32 scalars on the rewards' device: sums, so
    micro-batches and ranks add up, and tensors, so reading them does not wait for the device each batch."""
    margins = (chosen_rewards - rejected_rewards).float()
    return (margins > 0).sum().float(), margins.sum()


@dataclass(frozen=True)
class PreferenceEval:
    """Held-out pairs: preference accuracy (share with a positive reward margin), mean margin, mean loss."""

    pairs: int
    accuracy: float
    margin: float
    loss: float


def preference_metrics(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> tuple[float, float]:
    """(preference accuracy, mean reward margin) of per-pair rewards; (0, 0) without pairs."""
    if len(chosen_rewards) != len(rejected_rewards):
        raise ValueError(f"{len(chosen_rewards)} chosen rewards for {len(rejected_rewards)} rejected")
    if not chosen_rewards:
        return 0.0, 0.0
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def evaluate_pairs(model: Any, pairs: Sequence[PairEncoded], reference: Reference, settings: DpoSettings,
                   batch_size: int, pad_id: int, device: Any, selective: bool = True) -> PreferenceEval:
    """Preference accuracy, mean reward margin and mean loss of `model` on held-out `pairs` (eval mode, no
    gradients). A precomputed `reference` must be the table of these pairs (indexed 0..len-1)."""
    import torch

    chosen_rewards: list[float] = []
    rejected_rewards: list[float] = []
    loss_sum = 0.0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_pairs(chunk, pad_id, pair_ids=range(start, start + len(chunk)))
            policy = pair_logps(model, batch, device, selective)
            ref_chosen, ref_rejected = reference.logps(model, batch, device)
            loss_sum += float(dpo_losses(policy, ref_chosen, ref_rejected, settings).double().sum())
            chosen_rewards += implicit_rewards(policy.chosen, ref_chosen, settings.beta).tolist()
            rejected_rewards += implicit_rewards(policy.rejected, ref_rejected, settings.beta).tolist()
    accuracy, margin = preference_metrics(chosen_rewards, rejected_rewards)
    return PreferenceEval(len(pairs), accuracy, margin, loss_sum / len(pairs) if pairs else 0.0)


def disable_dropout(model: Any) -> int:
    """Dropout off in every module (LoRA's too), as TRL does by default for DPO: with dropout the policy at
    step 0 would not compute as its reference, and the log-ratios would be noise. Returns how many it set."""
    import torch

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            count += 1
    return count


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------


class DpoObjective:
    """The `dpo` objective for the training loop (`objectives.base.Objective`).

    `reference` serves the training pairs (by pair id when precomputed); `eval_reference` the held-out pairs
    (default: the same, which is right for the adapter and reference-free kinds; a precomputed reference
    needs the held-out pairs' own table)."""

    name = "dpo"
    packable = False

    def __init__(self, settings: DpoSettings, reference: Reference, eval_reference: Reference | None = None,
                 selective: bool = True):
        self.settings = settings
        self.reference = reference
        self.eval_reference = reference if eval_reference is None else eval_reference
        self.selective = selective

    def prepare(self, model: Any) -> None:
        disable_dropout(model)

    def length(self, item: PairEncoded) -> int:
        return pair_length(item)

    def batch(self, items: Sequence[PairEncoded], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
        return collate_pairs([items[i] for i in indices], pad_id, pair_ids=indices)

    def weight(self, batch: dict[str, Any]) -> int:
        return int(batch["pair_ids"].numel())

    def loss(self, model: Any, batch: dict[str, Any], device: Any, num_items: Any) -> StepLoss:
        policy = pair_logps(model, batch, device, self.selective)
        ref_chosen, ref_rejected = self.reference.logps(model, batch, device)
        losses = dpo_losses(policy, ref_chosen, ref_rejected, self.settings)
        chosen_rewards = implicit_rewards(policy.chosen, ref_chosen, self.settings.beta)
        rejected_rewards = implicit_rewards(policy.rejected, ref_rejected, self.settings.beta)
        correct, margin = preference_sums(chosen_rewards, rejected_rewards)
        return StepLoss(losses.sum() / num_items, {
            "preference_accuracy": correct, "reward_margin": margin,
            "reward_chosen": chosen_rewards.float().sum(), "reward_rejected": rejected_rewards.float().sum(),
            "logps_chosen": policy.chosen.detach().float().sum(),
            "logps_rejected": policy.rejected.detach().float().sum(),
        })

    def evaluate(self, model: Any, items: Sequence[PairEncoded], batch_size: int, pad_id: int,
                 device: Any) -> dict[str, float]:
        if not items:
            return {}
        result = evaluate_pairs(model, items, self.eval_reference, self.settings, batch_size, pad_id, device,
                                self.selective)
        return {"preference_accuracy": result.accuracy, "reward_margin": result.margin, "eval_loss": result.loss}
