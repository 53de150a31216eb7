"""Makes a trainer process need more memory at a larger micro-batch, as a real model does (test image only).

With FT_TEST_OOM_ABOVE_MICRO_BATCH=N, before a forward pass at a micro-batch above N the process allocates
and writes memory in 64 MiB blocks until the container's memory cgroup limit is reached: the kernel's OOM
killer ends it and the kubelet reports the container `OOMKilled`. Nothing here signals or exits on its own:
the kill is the kernel's. At a micro-batch of N or below the process runs unchanged. The tiny test model's
activations differ by a few MiB between micro-batches, too little to cross a limit reliably, hence this.
"""

import os

_ABOVE = os.environ.get("FT_TEST_OOM_ABOVE_MICRO_BATCH")

if _ABOVE:
    from finetune_trainer import oom

    _previous = oom.probe

    def _probe(*, micro_batch: int, step: int) -> None:
        if micro_batch > int(_ABOVE):
            print(f"oom-test: micro-batch {micro_batch} at step {step}: allocating until the limit", flush=True)
            held = []
            while True:
                held.append(b"\x01" * (64 << 20))  # written, so every page is charged to the cgroup
        _previous(micro_batch=micro_batch, step=step)

    oom.probe = _probe
