"""`make bench`: run every benchmark script, print each figure as `name=value`, then a short table.

Each script prints its own `name=value` lines from one run; this runner only collects them. A script that
fails is reported (with its last lines) and the others still run. GPU benchmarks are skipped where
torch sees no GPU. The table holds the headline figures beside the targets of issue 5 (`HEADLINES`);
every figure is in the `name=value` lines above it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "plan_bench.py",
    "throughput_bench.py",
    "sizing_accuracy_bench.py",
    "operator_scale_bench.py",
    "gpu_bench.py",
]
LINE = re.compile(r"^([a-z][a-z0-9_]*)=(\S+)$")
#: figure -> (what it is, target as text, test of the value against the target or None).
HEADLINES: dict[str, tuple[str, str, Callable[[float], bool] | None]] = {
    "throughput_ratio_full": ("useful tokens/s, ours / HF Trainer max_length, full", ">= 4", lambda v: v >= 4),
    "throughput_ratio_lora": ("same, LoRA", ">= 4", lambda v: v >= 4),
    "throughput_ratio_qlora": ("same, QLoRA", ">= 4", lambda v: v >= 4),
    "loss_delta_lora_seeds": ("held-out loss, ours - reference, LoRA, mean of 3 seeds", "<= noise", None),
    "loss_sd_lora_seeds": ("held-out loss noise across seeds (sd)", "", None),
    "sizing_error_pct_full": ("memory model vs measured peak, full (mean)", "+-20", lambda v: abs(v) <= 20),
    "sizing_error_pct_lora": ("same, LoRA", "+-20", lambda v: abs(v) <= 20),
    "sizing_error_pct_qlora": ("same, QLoRA", "+-20", lambda v: abs(v) <= 20),
    "operator_jobs_100_seconds": ("100 FineTuneJobs until every Job exists (s)", "", None),
    "operator_jobs_1000_seconds": ("1,000 FineTuneJobs until every Job exists (s)", "< 60", lambda v: v < 60),
    "operator_rss_mb_1000": ("operator peak RSS at 1,000 jobs (MiB)", "< 200", lambda v: v < 200),
    "plan_10000_manifests_seconds": ("finetune plan over 10,000 manifests (s)", "< 5", lambda v: v < 5),
    "gpu_lora_tokens_per_second_1b": ("GPU LoRA tokens/s, 1B", "", None),
    "gpu_lora_mfu_pct_1b": ("GPU LoRA MFU %, 1B", "", None),
}


def main() -> int:
    figures: list[tuple[str, str, str]] = []
    failed = []
    for script in SCRIPTS:
        path = HERE / script
        if not path.exists():
            print(f"# {script}: not present, skipped", flush=True)
            continue
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
        took = time.perf_counter() - start
        for line in result.stdout.splitlines():
            match = LINE.match(line.strip())
            if match:
                print(line.strip(), flush=True)
                figures.append((script, match.group(1), match.group(2)))
            elif line.startswith("#"):
                print(line, flush=True)
        if result.returncode != 0:
            failed.append(script)
            tail = "\n".join((result.stderr or result.stdout).splitlines()[-15:])
            print(f"# {script} FAILED (exit {result.returncode}, {took:.0f} s):\n{tail}", flush=True)
    print()
    values = {name: value for _, name, value in figures}
    rows = [("figure", "value", "target", "met", "what")]
    for name, (what, target, test) in HEADLINES.items():
        if name not in values:
            continue
        try:
            met = "" if test is None else ("yes" if test(float(values[name])) else "NO")
        except ValueError:
            met = "?"
        rows.append((name, values[name], target, met, what))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
