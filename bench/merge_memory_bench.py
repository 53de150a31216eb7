"""Memory of `merged/`: the trainer's streaming merge (finetune_trainer/merge.py) against peft's full-model
merge, on a Llama big enough for the difference to show.

Set-up (this process): a random Llama (default hidden 1024, 16 layers, MLP 2752, vocabulary 32,000: 0.27B
parameters, 0.54 GB in bf16) saved in shards of `--shard-size` (default 100MB), and a LoRA adapter (rank 16,
alpha 32, every linear layer: peft's `all-linear`) made with `get_peft_model` and a random lora_B (peft
starts it at zero, which would merge nothing).

Measured, each side in a fresh subprocess (imports done first): the peak resident memory (VmHWM of
/proc/self/status; see `peak_rss_bytes` for why not ru_maxrss) minus the peak after the imports, of

- `streaming`: `merge.merge_adapter(base, adapter, out)`: the trainer's merge (its `Merged.peak_bytes`, the
  bytes of tensors it held at once, and `bound_bytes`, the largest tensor or merged weight with its fp32
  update and A, B, are printed too, beside the largest base shard: the issue's bound is one shard plus one
  layer);
- `peft`: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()`
  then `save_pretrained(out, max_shard_size=<the same>)`: what `artifacts.py` did before.

Then (this process): both outputs compared tensor by tensor (`torch.equal`, one tensor at a time), and the
merged model's logits against the adapter's on the 16-bit base, both in fp32, on 4 prompts of 64 tokens:
the difference in bf16 roundoffs (2^-8) of the logits' scale, the unit of export.RELATIVE_TOLERANCE.

Figures, one `name=value` line each; with `--write` also to bench/results/merge-memory-2core-<YYYYMMDD>.txt
with the versions, machine and date (appended when the day's file exists).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import cpu_model, mlp_width, peak_rss_bytes

HERE = Path(__file__).resolve().parent
MIB = 1024**2


# ------------------------------------------------------------------------------------------------
# Children: one merge each
# ------------------------------------------------------------------------------------------------


def child(side: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_trainer import merge

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    baseline = peak_rss_bytes()
    started = time.monotonic()
    result: dict[str, Any] = {"side": side}
    if side == "streaming":
        merged = merge.merge_adapter(base, adapter, out)
        result.update(ledger_peak_bytes=merged.peak_bytes, bound_bytes=merged.bound_bytes, files=len(merged.files))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(out), max_shard_size=shard_size)
    result.update(seconds=round(time.monotonic() - started, 2), rss_peak_bytes=peak_rss_bytes() - baseline,
                  rss_baseline_bytes=baseline)
    return result


def run_child(side: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, str(base), str(adapter),
                           str(out), shard_size], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} merge failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------------------
# Set-up and comparison (parent)
# ------------------------------------------------------------------------------------------------


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path, int]:
    """The base (sharded) and a random adapter; returns their directories and the base's bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=mlp_width(args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False, dtype=args.dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits of a few tens, as trained models have, rather than about 1
    base = work / "base"
    model.save_pretrained(str(base), max_shard_size=args.shard_size)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype),
                                LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    adapter = work / "adapter"
    peft_model.save_pretrained(str(adapter))
    return base, adapter, size


def weight_map(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from finetune_trainer import merge

    return {info.name: directory / merge.SINGLE_FILE for info in merge.read_header(directory / merge.SINGLE_FILE)}


def compare_outputs(ours: Path, theirs: Path) -> tuple[int, int, float]:
    """(tensors, tensors not bit-identical, max abs difference), one tensor at a time."""
    import torch
    from safetensors import safe_open

    a, b = weight_map(ours), weight_map(theirs)
    if set(a) != set(b):
        raise SystemExit(f"outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    differing, worst = 0, 0.0
    for name in sorted(a):
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            differing += 1
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return len(a), differing, worst


def logits_roundoffs(base: Path, adapter: Path, merged: Path) -> tuple[float, float, float]:
    """(max |merged - adapter| logits in fp32, the logits' scale, that difference in bf16 roundoffs of scale)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_trainer import export

    prompts = [[(7 * i + 13 * j) % 30000 + 1 for j in range(64)] for i in range(4)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    reference = export.logits(model, prompts, "cpu")
    del model
    merged_logits = export.logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32), prompts, "cpu")
    diff = export.max_abs_diff(merged_logits, reference)
    scale = max(float(t.abs().max()) for t in reference)
    return diff, scale, diff / (2.0**-8 * max(1.0, scale))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, base, adapter, out, shard_size = sys.argv[2:7]
        print(json.dumps(child(side, Path(base), Path(adapter), Path(out), shard_size)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-size", default="100MB", help="the base's shards (save_pretrained max_shard_size)")
    parser.add_argument("--write", action="store_true", help="also write bench/results/merge-memory-2core-<date>.txt")
    args = parser.parse_args()

    import peft
    import safetensors
    import torch
    import transformers

    lines = [f"# machine: nproc={os.cpu_count()}, cpu={cpu_model()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, safetensors "
             f"{safetensors.__version__}; {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
             f"# python bench/merge_memory_bench.py {' '.join(sys.argv[1:])}".rstrip(),
             f"# model: Llama hidden {args.hidden}, {args.layers} layers, MLP {mlp_width(args.hidden)}, vocabulary "
             f"{args.vocab}, {args.dtype}, shards of {args.shard_size}; adapter: LoRA r={args.rank}, all-linear, random B"]
    for line in lines:
        print(line, flush=True)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        work = Path(tmp)
        base, adapter, size = build(work, args)
        figures["model_bytes"] = size
        figures["base_shards"] = len(set(weight_map(base).values()))
        figures["largest_base_shard_bytes"] = max(p.stat().st_size for p in set(weight_map(base).values()))
        ours = run_child("streaming", base, adapter, work / "ours", args.shard_size)
        theirs = run_child("peft", base, adapter, work / "peft", args.shard_size)
        figures.update({
            "streaming_rss_peak_bytes": ours["rss_peak_bytes"], "streaming_ledger_peak_bytes": ours["ledger_peak_bytes"],
            "streaming_bound_bytes": ours["bound_bytes"], "streaming_output_shards": ours["files"],
            "streaming_seconds": ours["seconds"], "peft_rss_peak_bytes": theirs["rss_peak_bytes"],
            "peft_seconds": theirs["seconds"],
            "rss_ratio_peft_over_streaming": round(theirs["rss_peak_bytes"] / max(ours["rss_peak_bytes"], 1), 2),
        })
        tensors, differing, worst = compare_outputs(work / "ours", work / "peft")
        figures.update(tensors_compared=tensors, tensors_differing=differing, max_abs_tensor_diff=worst)
        diff, scale, roundoffs = logits_roundoffs(base, adapter, work / "ours")
        figures.update(merged_vs_adapter_logits_max_abs_diff=f"{diff:.4g}", logits_scale=f"{scale:.4g}",
                       merged_vs_adapter_bf16_roundoffs_of_scale=f"{roundoffs:.2f}")
    for name, value in figures.items():
        line = f"{name}={value}"
        if name.endswith("_bytes"):
            line += f"  # {int(value) / MIB:.1f} MiB"
        lines.append(line)
        print(line, flush=True)
    summary = (f"# streaming merge peak RSS {figures['streaming_rss_peak_bytes'] / MIB:.0f} MiB (tensors held "
               f"{figures['streaming_ledger_peak_bytes'] / MIB:.0f} MiB, bound: one weight's merge "
               f"{figures['streaming_bound_bytes'] / MIB:.0f} MiB; one shard + one weight "
               f"{(figures['largest_base_shard_bytes'] + figures['streaming_bound_bytes']) / MIB:.0f} MiB) vs peft "
               f"merge_and_unload + save_pretrained "
               f"{figures['peft_rss_peak_bytes'] / MIB:.0f} MiB: {figures['rss_ratio_peft_over_streaming']}x less; "
               f"outputs {'identical' if differing == 0 else f'differ in {differing} tensors'}")
    lines.append(summary)
    print(summary)
    if args.write:
        out = HERE / "results" / f"merge-memory-2core-{datetime.now(UTC).strftime('%Y%m%d')}.txt"
        earlier = out.read_text() + "\n" if out.is_file() else ""  # several configurations of one day: appended
        out.write_text(earlier + "\n".join(lines) + "\n")
        print(f"# written to {out.relative_to(HERE.parent)}")
    return 0 if differing == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
