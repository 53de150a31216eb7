"""Attention on CPU: transformers' `eager` against `sdpa` for the tiny Llama's training step, by row length.

The trainer picks `eager` on CPU when its longest training row is at most
`modeling.CPU_EAGER_ATTENTION_MAX_ROW` tokens and `sdpa` otherwise (and always on a GPU); this script measures
the choice it rests on. One process, one thread (as every training benchmark), the tiny Llama of
bench/throughput_bench.py (hidden 256, 4 layers, 4 heads of 64, vocabulary 2048), precision by
`benchlib.bench_precision` (bf16 autocast where the CPU runs bf16 natively, else fp32). For each (micro-batch,
row length): random token ids, every row the full length, a forward with labels and the backward (weights in
the precision, as the trainer's full fine-tuning keeps them), for each implementation in turn (switched with `set_attn_implementation`, the same weights), the best of `--repeats`.

Figures: `attention_eager_over_sdpa_<batch>x<length>`: eager's step time / sdpa's (below 1: eager faster);
`attention_crossover_tokens`: the shortest measured length at which sdpa is faster (none: eager won at every
length measured), which `CPU_EAGER_ATTENTION_MAX_ROW` should stay below.

Usage: python bench/attention_bench.py [--shapes 4x64,4x160,4x320,4x512,2x1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchlib import bench_precision, build_tiny_inputs, cpu_model, scratch_dir

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x64,4x160,4x320,4x512,2x1024", help="micro-batch x row length, ...")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer import modeling

    torch.set_num_threads(1)
    precision, why = bench_precision(args.precision)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",") if shape]
    print(f"# machine: nproc={os.cpu_count()} cpu={cpu_model()!r} load_avg_at_start={os.getloadavg()[0]:.2f}")
    print(f"# precision: {why}; one thread; best of {args.repeats}; the trainer's threshold: eager up to "
          f"{modeling.CPU_EAGER_ATTENTION_MAX_ROW} tokens", flush=True)
    started = time.perf_counter()
    with scratch_dir("attention-bench-") as work:
        model_dir, _, _ = build_tiny_inputs(work, args.hidden, args.layers, "healthcare_train.jsonl")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.train()
        vocab = model.config.vocab_size
        crossover = None
        for batch, length in shapes:
            ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
            best = {"eager": float("inf"), "sdpa": float("inf")}
            for _ in range(args.repeats):
                for impl in ("eager", "sdpa"):
                    model.set_attn_implementation(impl)
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                    best[impl] = min(best[impl], time.perf_counter() - start)
            ratio = best["eager"] / best["sdpa"]
            print(f"# {batch} x {length}: eager {1e3 * best['eager']:.1f} ms, sdpa {1e3 * best['sdpa']:.1f} ms "
                  "(forward + backward)", flush=True)
            print(f"attention_eager_over_sdpa_{batch}x{length}={ratio:.2f}")
            if ratio > 1 and crossover is None:
                crossover = length
        print(f"attention_crossover_tokens={crossover if crossover is not None else 'none'}")
    print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
