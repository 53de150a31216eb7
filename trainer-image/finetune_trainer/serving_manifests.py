"""The serving manifests written with the artifacts (spec.serving): `<output.uri>/serving/*.yaml`.

What they say is `finetune_operator.serving`'s (pure, shared with the operator and `finetune plan`); this only
puts the files in the artifacts' staging directory and names their kinds for status.artifacts.
"""

from __future__ import annotations

from pathlib import Path

from finetune_operator import contract, serving


def write(config: contract.TrainerConfig, stage: Path) -> dict[str, str]:
    """Write the manifests under `stage` (nothing for the pilot or without spec.serving); returns kind -> key."""
    files = serving.config_manifest_files(config)
    for key, text in files.items():
        path = stage / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {kind: key for kind, key in serving.ARTIFACT_KINDS.items() if key in files}
