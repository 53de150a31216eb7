"""Stands in for the kernel's OOM killer in the trainer processes the pod runner starts (test only).

On PYTHONPATH with FT_TEST_OOM_ABOVE_MICRO_BATCH=N: before a forward pass at a micro-batch above N, the
process writes the pod runner's OOM marker ($PODRUNNER_OOM_MARKER) and SIGKILLs its process group, as the
OOM killer ends a container that outgrew its memory: no exception, no report, exit 137, which the pod runner
reports as `OOMKilled`. Any other process is left as it is.
"""

import os

_ABOVE = os.environ.get("FT_TEST_OOM_ABOVE_MICRO_BATCH")

if _ABOVE:
    import signal
    from pathlib import Path

    from finetune_trainer import oom

    def _probe(*, micro_batch: int, step: int) -> None:
        if micro_batch > int(_ABOVE):
            marker = os.environ.get("PODRUNNER_OOM_MARKER")
            if marker:
                Path(marker).write_text(f"micro-batch {micro_batch} at step {step}\n")
            os.killpg(os.getpgid(0), signal.SIGKILL)

    oom.probe = _probe
