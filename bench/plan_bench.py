"""Planning throughput: `finetune plan` over 10,000 manifests in one invocation (target: under 5 s).

Writes N varied manifests (sizes 1B..180B, every method, some with explicit resources) to a temp dir,
runs the real console script over all of them with `-o json`, checks every plan came back, and prints
`name=value` lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SIZES = ["1B", "3B", "7B", "8B", "13B", "34B", "70B", "180B"]
METHODS = ["auto", "full", "lora", "qlora"]


def manifest(i: int) -> dict:
    size, method = SIZES[i % len(SIZES)], METHODS[(i // len(SIZES)) % len(METHODS)]
    spec: dict = {
        "baseModel": {"uri": f"s3://models/model-{i}/", "parameters": size},
        "method": method,
        "dataset": {"train": f"s3://data/job-{i}/train.jsonl", "examples": 1000 + 37 * i},
        "output": {"uri": f"s3://artifacts/job-{i}/"},
        "hyperparameters": {"maxSeqLength": [512, 1024, 2048, 4096][i % 4], "batchSize": 1 + i % 4},
    }
    if i % 5 == 0:
        spec["resources"] = {"gpus": 8, "gpusPerNode": 8}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"job-{i}"}, "spec": spec}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000)
    args = parser.parse_args()
    finetune = shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.n):
            path = Path(tmp) / f"job-{i}.yaml"
            path.write_text(yaml.safe_dump(manifest(i)))
            files.append(str(path))
        start = time.perf_counter()
        result = subprocess.run([finetune, "plan", *files, "-o", "json"], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return 1
    plans = json.loads(result.stdout)
    assert len(plans) == args.n, len(plans)
    print(f"plan_{args.n}_manifests_seconds={elapsed:.2f}")
    print(f"plan_manifests_per_second={args.n / elapsed:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
