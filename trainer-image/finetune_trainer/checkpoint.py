"""Checkpoints under `<output.uri>/checkpoints/step-N/`, and resuming from the newest complete one.

A checkpoint holds everything needed to continue exactly where training stopped:

    model/             the adapter (lora, qlora, prefix, prompt) or the full weights (full), save_pretrained
                       layout, plus what the method needs to resume exactly (prefix and prompt: the whole
                       prompt encoder, methods/virtual.py)
    optimizer.pt       AdamW state (a full, unsharded state dict also under FSDP)
    scheduler.pt       learning-rate scheduler state
    scaler.pt          the fp16 gradient scaler (fp16 only)
    rng-<rank>.json    python, numpy and torch (CPU and CUDA) RNG states of every process
    trainer_state.json step, data position (epoch, micro-batches consumed in it, world size), base scores,
                       the memory rung (micro-batch, accumulation, gradient checkpointing) and the
                       out-of-memory adjustments so far
    metrics.jsonl      the metrics log up to this step
    reference_logps.safetensors
                       objective dpo with a precomputed reference: the reference log-probabilities of the
                       training and validation pairs, computed once before the first step (objectives/build.py)
    _COMPLETE          written last, by rank 0, after every process's files are uploaded

A checkpoint without `_COMPLETE` (the writer died while uploading) is ignored and deleted on resume.
After each new complete checkpoint, all but the `keep` newest complete ones are deleted (marker first, so
a half-deleted checkpoint never looks complete). Everything is loaded with `torch.load(weights_only=True)`
or JSON: nothing in the bucket is unpickled as code.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune_operator.contract import CHECKPOINTS_PREFIX

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where training is, saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    #: Micro-batches this process has consumed in `epoch` (world size `world_size`).
    batches_in_epoch: int = 0
    world_size: int = 1
    total_steps: int = 0
    #: Base-model scores measured before the first step (so a resumed run does not measure them again).
    base_scores: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The memory rung trained at (contract.MemoryRung, wire form): `batches_in_epoch` counts its micro-batches.
    #: None in checkpoints from before the out-of-memory ladder (they trained at the spec's rung).
    rung: dict[str, Any] | None = None
    #: Out-of-memory adjustments so far (contract.Adjustment, wire form), oldest first.
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    #: GPU-seconds used up to this checkpoint over every attempt (wall seconds x training processes), what
    #: spec.budget.maxGpuHours caps. Time after an attempt's last checkpoint is not known to the next one.
    gpu_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def rescale(self, world_size: int) -> TrainState:
        """The same data position for another world size (global micro-batches are what count)."""
        if world_size == self.world_size:
            return self
        consumed = self.batches_in_epoch * self.world_size // world_size
        log.warning("resuming a world of %d process(es) from one of %d: data position rescaled",
                    world_size, self.world_size)
        return replace(self, batches_in_epoch=consumed, world_size=world_size)

    def regroup(self, micro_batch: int, grad_accum: int) -> TrainState:
        """The same data position counted in micro-batches of another rung (the out-of-memory ladder).

        A checkpoint is taken after an optimizer step, so `batches_in_epoch` is a whole number of steps of
        `grad_accum` micro-batches (or the epoch's last, shorter group). Every rung keeps the step's examples
        (micro-batch x accumulation, `dataset.batch_plan`), so steps done are what carry over. A position past
        the epoch's last batch at the new rung starts the next epoch, as the loop does anyway.
        """
        if self.rung is None or self.rung.get("microBatch") == micro_batch:
            return self
        steps_done = math.ceil(self.batches_in_epoch / self.rung["gradAccum"])
        log.warning("resuming at micro-batch %d x %d from a checkpoint at %d x %d: data position regrouped",
                    micro_batch, grad_accum, self.rung["microBatch"], self.rung["gradAccum"])
        return replace(self, batches_in_epoch=steps_done * grad_accum)


def prefix(step: int) -> str:
    return f"{CHECKPOINTS_PREFIX}step-{step}"


def _steps(store: Any) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps in storage, ascending."""
    seen: set[int] = set()
    for key in store.list(CHECKPOINTS_PREFIX):
        name = key[len(CHECKPOINTS_PREFIX):].split("/", 1)[0]
        match = _STEP_DIR.match(name)
        if match:
            seen.add(int(match.group(1)))
    complete = [s for s in sorted(seen) if store.is_complete(prefix(s))]
    return complete, [s for s in sorted(seen) if s not in complete]


def complete_steps(store: Any) -> list[int]:
    return _steps(store)[0]


def latest_complete(store: Any) -> int | None:
    steps = complete_steps(store)
    return steps[-1] if steps else None


def discard_incomplete(store: Any) -> None:
    """Delete checkpoints whose writer died before the marker: they can never be resumed from."""
    for step in _steps(store)[1]:
        log.info("deleting incomplete checkpoint %s", store.child(prefix(step)))
        store.delete_prefix(prefix(step))


def enforce_retention(store: Any, keep: int) -> list[int]:
    """Delete all but the `keep` newest complete checkpoints; returns the steps kept."""
    steps = complete_steps(store)
    for step in steps[:-keep]:
        store.delete_prefix(prefix(step))
    return steps[-keep:]


# ------------------------------------------------------------------------------------------------
# RNG state (JSON, per process)
# ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state(legacy=True)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------
# Save and load
# ------------------------------------------------------------------------------------------------


def _optimizer_state(model: Any, optimizer: Any, fsdp: bool) -> Any:
    if fsdp:
        # Collective: every rank contributes its shard; the full state dict lands on every rank (CPU).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def save(
    *,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    store: Any,
    staging: Path,
    metrics_path: Path | None,
    fsdp: bool,
    save_state: Callable[[Any, Path], None] | None = None,
    extra: Callable[[Path], Any] | None = None,
) -> str:
    """Write checkpoint `state.step` from every process; returns its URI once its marker is written.
    `extra` writes further files into the checkpoint's directory (rank 0)."""
    import torch

    key = prefix(state.step)
    local = staging / f"step-{state.step}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    full_state = accelerator.get_state_dict(model) if fsdp else None  # collective under FSDP
    optim_state = _optimizer_state(unwrapped, optimizer, fsdp)  # collective under FSDP
    rank = accelerator.process_index
    rng_json = json.dumps(rng_state())
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(local / "model"), state_dict=full_state, safe_serialization=True)
        if save_state is not None:
            save_state(unwrapped, local / "model")
        torch.save(optim_state, local / "optimizer.pt")
        torch.save(scheduler.state_dict(), local / "scheduler.pt")
        if getattr(accelerator, "scaler", None) is not None:
            torch.save(accelerator.scaler.state_dict(), local / "scaler.pt")
        (local / "trainer_state.json").write_text(state.to_json())
        (local / f"rng-{rank}.json").write_text(rng_json)
        if metrics_path is not None and metrics_path.is_file():
            shutil.copy(metrics_path, local / "metrics.jsonl")
        if extra is not None:
            extra(local)
    else:
        store.write_bytes(f"{key}/rng-{rank}.json", rng_json.encode())
    accelerator.wait_for_everyone()  # every process's files are up before the marker
    if accelerator.is_main_process:
        store.upload_dir(local, key, marker=True)
    accelerator.wait_for_everyone()
    shutil.rmtree(local, ignore_errors=True)
    return str(store.child(key))


@dataclass
class Restored:
    """A downloaded checkpoint: where its files are, and its state."""

    step: int
    directory: Path
    state: TrainState

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"


def download(store: Any, step: int, local_root: Path, *, fresh: bool) -> Restored:
    """Checkpoint `step` under `local_root`: downloaded anew when `fresh` (one process per machine),
    else the copy that process made (the others run after it)."""
    local = local_root / f"step-{step}"
    if fresh:
        shutil.rmtree(local, ignore_errors=True)
        store.download_prefix(prefix(step), local)
    state = TrainState.from_json((local / "trainer_state.json").read_text())
    return Restored(step, local, state)


def load_training_state(
    restored: Restored, *, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, fsdp: bool, seed: int
) -> None:
    """Load optimizer, scheduler, scaler and this process's RNG state from a downloaded checkpoint."""
    import torch

    optim_state = torch.load(restored.directory / "optimizer.pt", map_location="cpu", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        set_optimizer_state_dict(accelerator.unwrap_model(model), inner, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(restored.directory / "scheduler.pt", weights_only=True))
    scaler_path = restored.directory / "scaler.pt"
    if scaler_path.is_file() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(torch.load(scaler_path, weights_only=True))
    rng_path = restored.directory / f"rng-{accelerator.process_index}.json"
    if rng_path.is_file() and restored.state.world_size == accelerator.num_processes:
        set_rng_state(json.loads(rng_path.read_text()))
    else:
        # Another world size: there is no saved state for this process; seed it reproducibly instead.
        from accelerate.utils import set_seed

        set_seed(seed + restored.step * 1000 + accelerator.process_index)
