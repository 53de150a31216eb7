"""`python -m finetune_trainer.fetch URI DIR`: copy a model or adapter into DIR (the serving pod's init container).

The plain vLLM Deployment (`finetune_operator.serving.render_vllm`, `<output.uri>/serving/vllm.yaml`) runs this in
the trainer image, which has boto3 and the storage code: the vLLM image reads local paths and the hub, not S3.

* `s3://bucket/prefix/`: every object under the prefix, layout kept (credentials and endpoint from the
  environment, as the trainer's: the spec's Secrets arrive by `envFrom`).
* `hf://org/name`, `pvc://claim/path`, `file:///path`: through `storage.fetch` (same confinement rules), then copied.

Exit codes are the trainer's: 3 for a missing object or denied access (retrying cannot help), 1 when S3 stayed
unreachable (the kubelet restarts the init container).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from finetune_operator import uris
from finetune_trainer.errors import TrainerFailure
from finetune_trainer.storage import Store, fetch


def fetch_into(uri: str, dest: str | Path) -> Path:
    """Copy what `uri` names into the directory `dest` (created); returns `dest`."""
    target = Path(dest)
    parsed = uris.parse(uri)
    if parsed.scheme == "s3":
        return Store.for_uri(uri).download_prefix("", target)
    with tempfile.TemporaryDirectory(prefix="fetch-") as cache:
        source = fetch(uri, cache)
        target.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            # symlinks=False: the hub's cache links to blobs; the copy holds the files themselves.
            shutil.copytree(source, target, symlinks=False, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target / source.name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="s3://bucket/prefix/, hf://org/name, pvc://claim/path or file:///path")
    parser.add_argument("dest", help="directory to copy into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = fetch_into(args.uri, args.dest)
    except ValueError as err:  # an unsupported or unsafe URI
        print(f"fetch: {err}", file=sys.stderr)
        return 3
    except TrainerFailure as err:
        print(f"fetch: {err}", file=sys.stderr)
        return err.exit_code
    files = sum(1 for p in path.rglob("*") if p.is_file())
    print(f"fetched {args.uri} into {path} ({files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
