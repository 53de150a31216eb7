"""Serving-ready exports and their checks at the end of training (rank 0, `artifacts.publish`).

1. `model/adapter_config.json` names the base by the name it is served under
   (`spec.served_base_model_name()`: spec.serving.baseModelName, else the base URI's model id), not the
   trainer's cache path, because vLLM and KServe match adapters to a served base by that name; the LoRA
   rank is peft's `r` and `target_modules` is written as a sorted list (peft resolves `all-linear` to names).
2. The saved adapter is loaded with peft (`PeftModel.from_pretrained`) on a freshly loaded base, as the run
   trained it (qlora: the same 4-bit base), and its logits on a few sample prompts are compared with the
   trained model's: `ExportCheck.adapterMaxAbsDiff`. Both run on the training device in the training
   precision (accelerate's autocast), so the difference measures the saved files, not a change of kernels.
3. With spec.output.saveMerged, `merged/` comes from the streaming merge (`merge.py`: tensor by tensor, at
   most one weight with its fp32 update in memory, `mergePeakBytes`), and its logits are compared with the
   adapter's on the 16/32-bit base (`mergedMaxAbsDiff`), one model at a time after the trained model is
   released, where a whole model fits (`merged_check_place`): on the CPU in fp32 when no GPU is there and the
   host has 4 bytes per parameter to spare (every CPU run, the tests'), else on the GPU in the merged weights'
   dtype, else not at all, saying why in `ExportCheck.mergedCheck` (a 70B qlora merge fits neither a 48 GB
   GPU nor a pod's memory: the merge itself streams, a whole-model comparison cannot).

Sample prompts: the first `PROMPTS` examples of the test set (then validation, then training), their first
`PROMPT_TOKENS` tokens: the same on every run of the same data, and examples the model saw formatted as in
training.

Tolerance (`ExportCheck.tolerance`): `RELATIVE_TOLERANCE` of the coarsest dtype the compared computations
use (training's autocast, the frozen base, qlora's compute dtype, the merged weights), times the logits'
scale (max |logit| of the reference, at least 1). Exact arithmetic would give 0 (the adapter is reloaded
from the very tensors that trained, and the merge adds the same fp32 update peft adds) and so does the
reload on a CPU; what remains elsewhere is rounding. Measured on random Llamas (hidden 512 and 1024, 4 to
16 layers, rank-16 adapters on every linear layer): merged/ in bf16 differs from the adapter by 1.4 to 2.2
bf16 roundoffs (2^-8) of the logits' scale, in fp32 by 16 to 27 fp32 roundoffs (2^-24; the merged matmul
sums in another order than base + adapter); the adapters moved the logits by 100 to 300 bf16 roundoffs of
scale. The tolerances leave about 8x (bf16) and 150x (fp32, where the order effects grow with width and
depth) over those roundings, and a wrong export (a missing module, a wrong scaling, adapter weights
truncated, another base) moves the logits by the adapter's whole effect, far above them.
A difference above the tolerance fails the run with ExportCheckFailed and no completion marker (as
GatesFailed does): the files stay for inspection.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.spec import ExportCheck
from finetune_trainer.errors import ExportCheckFailed

if TYPE_CHECKING:
    from finetune_trainer.merge import Merged
    from finetune_trainer.runtypes import RunContext as Run

log = logging.getLogger(__name__)

#: How many sample prompts the checks compare logits on, and their length in tokens.
PROMPTS = 4
PROMPT_TOKENS = 64
#: Largest accepted max-abs logit difference, relative to the logits' scale, by the coarsest dtype involved:
#: 16 bf16 roundoffs (2^-8 each), 16 fp16 roundoffs (2^-11), 4096 fp32 roundoffs (2^-24). See the module
#: docstring for what was measured; bench/merge_memory_bench.py prints the bf16 figure for its model.
RELATIVE_TOLERANCE = {"bfloat16": 2.0**-4, "float16": 2.0**-7, "float32": 2.0**-12}


def dtype_name(dtype: Any) -> str:
    """"float32" for torch.float32 (and for "float32")."""
    return str(dtype).removeprefix("torch.")


def tolerance(dtypes: Iterable[Any], scale: float) -> float:
    """`RELATIVE_TOLERANCE` of the coarsest of `dtypes`, times max(1, `scale`)."""
    relative = max(RELATIVE_TOLERANCE.get(dtype_name(d), RELATIVE_TOLERANCE["float32"]) for d in dtypes)
    return relative * max(1.0, scale)


def max_abs_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    """The largest |a - b| over lists of logits tensors of equal shapes."""
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def sample_prompts(inputs: Any, count: int = PROMPTS, tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    """The first `count` examples of the test set, then of validation, then of training; each cut to `tokens`."""
    items = [*inputs.test[:count], *inputs.validation[:count], *inputs.train[:count]][:count]
    # A preference pair (objective dpo) is sampled as its prompt and chosen answer.
    return [list((item.input_ids if hasattr(item, "input_ids") else [*item.prompt_ids, *item.chosen_ids])[:tokens])
            for item in items]


def finish_adapter_config(model_dir: Path, served_name: str) -> dict[str, Any]:
    """Rewrite `model_dir/adapter_config.json` for serving: the served base name (also in peft's README.md there),
    target modules as a sorted list."""
    path = model_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    local = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = served_name
    card = model_dir / "README.md"  # peft's card names the base in its front matter (base_model, tags)
    if local and card.is_file():
        card.write_text(card.read_text().replace(str(local), served_name))
    if isinstance(config.get("target_modules"), list | tuple | set):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def logits(model: Any, prompts: Sequence[Sequence[int]], device: Any, autocast: Any = None) -> list[Any]:
    """The model's logits on each prompt (one at a time: no padding), in eval mode, as fp32 CPU tensors."""
    import torch

    model.eval()
    out = []
    with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            out.append(model(input_ids=ids, use_cache=False).logits.float().cpu())
    return out


def _free() -> None:
    """Return released models' memory now (the next model is loaded right after)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_dtypes(run: Run) -> set[str]:
    """The dtypes the training forward computes in: autocast's, the frozen base's, and qlora's compute dtype."""
    dtypes = {dtype_name(run.precision.base_dtype)}
    dtypes.add({"bf16": "bfloat16", "fp16": "float16"}.get(run.precision.mixed, "float32"))
    if run.config.method == "qlora":
        from finetune_trainer.methods.qlora import quantization_config

        quantization, _ = quantization_config(run.config, run.accelerator.device.type)
        compute = getattr(quantization, "bnb_4bit_compute_dtype", None)
        if compute is not None:
            dtypes.add(dtype_name(compute))
    return dtypes


def save_merged(run: Run, stage: Path) -> Merged:
    """`merged/`: the streaming merge of `model/` into the base on disk, plus the tokenizer."""
    from finetune_trainer import merge

    started = time.monotonic()
    merged = merge.merge_adapter(run.model_dir, stage / "model", stage / "merged")
    run.tokenizer.save_pretrained(str(stage / "merged"))
    log.info("merged/ written in %.1f s: %d weights merged, %d shard(s), peak %.1f MiB of tensors held "
             "(bound: the largest weight's merge, %.1f MiB)", time.monotonic() - started,
             len(merged.merged), len(merged.files), merged.peak_bytes / 2**20, merged.bound_bytes / 2**20)
    return merged


def check(run: Run, stage: Path, merged: Merged | None) -> ExportCheck | None:
    """The export checks (rank 0, after model/ and merged/ are staged); None for methods without an adapter.

    Releases the trained model (`Run._release`): the reloaded base takes its place on the device, so the
    check needs no more device memory than training did."""
    from peft import PeftModel

    from finetune_trainer import modeling

    if not run.method.adapter:
        return None
    prompts = sample_prompts(run.inputs)
    accelerator = run.accelerator
    device = accelerator.device
    trained = logits(accelerator.unwrap_model(run.model), prompts, device, accelerator.autocast)
    run._release()
    _free()

    base = modeling.load_base(run.model_dir, run.config.method, run.precision, device, run.config)
    if run.config.method == "qlora":
        # As training prepared it (methods/qlora.py): the weights peft keeps in fp32 next to the 4-bit ones
        # (norms, embeddings, head), and no CPU repacking of the 4-bit weights.
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        modeling.keep_4bit_weights_unpacked(base)
    reloaded = PeftModel.from_pretrained(base, str(stage / "model"))
    adapter_diff = max_abs_diff(trained, logits(reloaded, prompts, device, accelerator.autocast))
    del base, reloaded
    _free()
    scale = max(float(t.abs().max()) for t in trained)
    dtypes = training_dtypes(run)

    merged_diff = None
    where: str | None = None
    if merged is not None:
        place = merged_check_place(merged)
        if isinstance(place, str):
            where = f"not compared: {place}"
            log.warning("export check: merged/ %s", where)
        else:
            check_device, dtype = place
            where = f"{check_device.type} {dtype_name(dtype)}"
            precision = modeling.Precision("no", dtype)
            base = modeling.load_base(run.model_dir, "lora", precision, check_device, run.config, quantized=False)
            adapter_logits = logits(PeftModel.from_pretrained(base, str(stage / "model")), prompts, check_device)
            del base
            _free()
            from transformers import AutoModelForCausalLM

            merged_model = AutoModelForCausalLM.from_pretrained(str(merged.out_dir), dtype=dtype).to(check_device)
            merged_diff = max_abs_diff(adapter_logits, logits(merged_model, prompts, check_device))
            del merged_model
            _free()
            dtypes.update({merged.dtype, dtype_name(dtype)})
            scale = max(scale, max(float(t.abs().max()) for t in adapter_logits))

    tol = tolerance(dtypes, scale)
    result = ExportCheck(
        prompts=len(prompts), tolerance=tol, adapter_max_abs_diff=adapter_diff, merged_max_abs_diff=merged_diff,
        merge_peak_bytes=merged.peak_bytes if merged is not None else None, merged_check=where,
        passed=adapter_diff <= tol and (merged_diff is None or merged_diff <= tol))
    log.info("export check: adapter reload max |diff| %.3g, merged %s, tolerance %.3g (%s): %s", adapter_diff,
             "-" if merged_diff is None else f"{merged_diff:.3g}", tol, ", ".join(sorted(dtypes)),
             "passed" if result.passed else "FAILED")
    run.export_check = result
    run.reporter.update(export=result)
    return result


#: Share of the free device or host memory a whole-model comparison may take (the rest: activations of the
#: short sample prompts, the allocator, and whatever else the process holds).
CHECK_MEMORY_SHARE = 0.8


def host_memory_available() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by the cgroup's limit (a pod's memory
    limit) minus its usage; None where neither can be read."""
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            figures.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(figures) if figures else None


def merged_check_place(merged: Merged) -> tuple[Any, Any] | str:
    """Where merged/ is compared with the adapter, one whole model at a time: (device, dtype), or why not.

    No GPU: the CPU in fp32 (full precision) when the host has room for it. A GPU: the GPU in the merged
    weights' dtype when it has room (training just released a model at least that large, except for qlora,
    whose 16-bit base is 4x its training weights)."""
    import torch

    on_disk = sum((merged.out_dir / name).stat().st_size for name in merged.files)
    dtype = getattr(torch, merged.dtype, torch.float32)
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        if on_disk <= CHECK_MEMORY_SHARE * free:
            return torch.device("cuda", torch.cuda.current_device()), dtype
        return (f"the merged model ({on_disk / 2**30:.1f} GiB in {merged.dtype}) does not fit the GPU's "
                f"{free / 2**30:.1f} GiB free")
    fp32_bytes = on_disk * 4 // max(torch.empty((), dtype=dtype).element_size(), 1)
    available = host_memory_available()
    if available is None or fp32_bytes <= CHECK_MEMORY_SHARE * available:
        return torch.device("cpu"), torch.float32
    return (f"the merged model in float32 ({fp32_bytes / 2**30:.1f} GiB) does not fit the "
            f"{available / 2**30:.1f} GiB of host memory left")


def failure_message(result: ExportCheck) -> str | None:
    """What failed, with the differences and the tolerance; None when the check passed."""
    if result.passed is not False:
        return None
    parts = []
    if result.adapter_max_abs_diff is not None and result.adapter_max_abs_diff > (result.tolerance or 0):
        parts.append(f"the saved adapter reloaded on the base gives logits up to {result.adapter_max_abs_diff:.3g} "
                     "from the trained model's")
    if result.merged_max_abs_diff is not None and result.merged_max_abs_diff > (result.tolerance or 0):
        parts.append(f"merged/ gives logits up to {result.merged_max_abs_diff:.3g} from the adapter's")
    return (f"{'; '.join(parts)} (tolerance {result.tolerance:.3g}, on {result.prompts} sample prompts): the "
            "exported files do not compute what was trained, so the output is not marked complete. The files "
            "are uploaded for inspection; please report this with the job's spec")


def passed(run: Run) -> bool:
    """Whether this process's export check passed (or there was none): rank 0's answer, e.g. for tracking."""
    result: ExportCheck | None = getattr(run, "export_check", None)
    return result is None or result.passed is not False


def raise_if_failed(run: Run) -> None:
    """On every rank: ExportCheckFailed when rank 0's export check failed (agreed, so all ranks exit alike)."""
    result: ExportCheck | None = getattr(run, "export_check", None)
    message = failure_message(result) if result is not None else None
    if run._agreed(message is not None):
        raise ExportCheckFailed(message or "the export check failed on rank 0 (see its log and report.export)")

