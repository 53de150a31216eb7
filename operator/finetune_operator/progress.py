"""Reading the trainer's progress report (`<output.uri>/status/report.json`), and the CPU pre-flight's result
(`<output.uri>/preflight.json`), from the operator.

The trainer's rank 0 rewrites the report after every logging step, checkpoint and phase change
(`contract.TrainerReport`). The operator reads it on each status refresh to fill status.progress,
checkpoints, artifacts and evaluation.

Where the operator's S3 access comes from (the operator's own identity, never a job's Secret):

- endpoint: `FT_S3_ENDPOINT` (the same setting the training pods get), else `AWS_ENDPOINT_URL`, else AWS;
- region: `FT_S3_REGION`, else `AWS_REGION` / `AWS_DEFAULT_REGION` (boto3's chain);
- credentials: boto3's default chain in the operator pod: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
  IRSA / EKS Pod Identity web-identity tokens, instance metadata. The operator needs `s3:GetObject` on
  `<output prefix>/status/report.json` and `<output prefix>/preflight.json` of the jobs it should show progress
  for (and plan from).

Reading never raises: a missing report (the trainer has not started) gives None quietly; any other
failure (access denied, endpoint down) gives None and is logged once per output URI and kind of failure,
so a broken bucket cannot crash or flood the operator. The status then comes from the Job alone and keeps
the last progress it had.

What is read is not trusted: the output URI is the tenant's choice, and the operator's identity may reach
other tenants' prefixes. An object is `Ignored` (not returned, logged once, and reported to the caller,
which posts one Warning event per cause on the FineTuneJob) when it is

- `oversized`: larger than MAX_REPORT_BYTES (refused from its Content-Length, or after reading at most one
  byte more, before any parsing);
- `foreign`: its `jobUid` is not the FineTuneJob's uid (another job's report: its loss, scores and artifact
  URIs, or a forged pre-flight result that would lower the plan);
- `unowned`: it has no `jobUid` (a trainer image older than this operator, or not written by a trainer):
  refused as well, since anyone can write an object without one;
- `invalid`: not JSON, not the model, or a list over its cap (`contract.MAX_REPORT_*`, `MAX_PREFLIGHT_*`):
  refused whole, never truncated.

The owner is checked before the model, so the event about another job's object says nothing of its content.

`pvc://` outputs: the report lives on a volume only training pods mount; the operator cannot read it,
so such jobs show phase, conditions and restarts from the Job but no progress, checkpoints or scores.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ValidationError

from finetune_operator import uris
from finetune_operator.contract import PREFLIGHT_KEY, REPORT_KEY, PreflightResult, TrainerReport

log = logging.getLogger(__name__)

#: A report is a few KiB (100 checkpoints and a 4,000-character error stay under 20 KiB); anything larger
#: is not one and is not read into memory.
MAX_REPORT_BYTES = 256 * 1024
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
#: The key of the FineTuneJob's uid in a report and a pre-flight result (`jobUid` of the contract's models).
UID_KEY = "jobUid"

Cause = Literal["oversized", "foreign", "unowned", "invalid"]


@dataclass(frozen=True)
class Ignored:
    """An object at a job's output that the reader refused (see the module docstring for the causes)."""

    cause: Cause
    uri: str  # s3://bucket/key of the object
    message: str


def report_location(output_uri: str, name: str = REPORT_KEY) -> tuple[str, str] | None:
    """(bucket, key) of the report (or another object `name` under the output, such as the pre-flight's
    result) for an s3:// output, None for outputs the operator cannot read."""
    parsed = uris.parse(output_uri, ("s3", "pvc"))
    if parsed.scheme != "s3":
        return None
    prefix = parsed.path.strip("/")
    return parsed.authority, f"{prefix}/{name}" if prefix else name


class ReportReader:
    """Reads TrainerReports with one shared boto3 client (thread-safe; call `read` from a worker thread)."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
    ):
        self.endpoint_url = endpoint_url
        self.region = region
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._client: Any = None
        self._lock = threading.Lock()
        # output URI -> kinds of failure already logged for it (keyed by URI, so that a successful read
        # forgets its URI's warnings without scanning every other job's).
        self._warned: dict[str, set[str]] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ReportReader:
        env = os.environ if env is None else env
        endpoint = (env.get("FT_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or "").strip() or None
        region = (env.get("FT_S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip()
        return cls(endpoint_url=endpoint, region=region or None)

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    # Status refreshes come again in seconds: fail fast instead of stalling the handler.
                    retries={"mode": "standard", "total_max_attempts": 2},
                    # Custom endpoints (MinIO, SeaweedFS, Ceph) rarely have wildcard DNS for buckets.
                    s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
                )
            return self._client

    def read(self, output_uri: str, uid: str) -> TrainerReport | Ignored | None:
        """The report at `output_uri` of the FineTuneJob whose metadata.uid is `uid`; None when there is none
        or it cannot be read, `Ignored` when it is refused (see the module docstring)."""
        found = self._read(output_uri, uid, REPORT_KEY, TrainerReport, "progress report")
        return found if isinstance(found, TrainerReport | Ignored) else None

    def read_preflight(self, output_uri: str, uid: str) -> PreflightResult | Ignored | None:
        """The CPU pre-flight's result (`<output_uri>/preflight.json`) of the FineTuneJob `uid`, as `read`."""
        found = self._read(output_uri, uid, PREFLIGHT_KEY, PreflightResult, "pre-flight result")
        return found if isinstance(found, PreflightResult | Ignored) else None

    def _read(self, output_uri: str, uid: str, name: str, model: type[BaseModel],
              what: str) -> BaseModel | Ignored | None:
        try:
            where = report_location(output_uri, name)
        except ValueError as err:
            self._warn_once(output_uri, "uri", f"cannot read the {what} of {output_uri!r}: {err}")
            return None
        if where is None:
            return None
        bucket, key = where
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client().get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                declared = response.get("ContentLength")
                too_large = isinstance(declared, int) and declared > MAX_REPORT_BYTES
                data = b"" if too_large else body.read(MAX_REPORT_BYTES + 1)
            finally:
                body.close()
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return None
            self._warn_once(output_uri, code or "client", f"cannot read s3://{bucket}/{key}: {code or err}")
            return None
        except (BotoCoreError, OSError) as err:
            self._warn_once(output_uri, type(err).__name__, f"cannot read s3://{bucket}/{key}: {err}")
            return None
        location = f"s3://{bucket}/{key}"
        noun = what.removeprefix("progress ")
        if too_large or len(data) > MAX_REPORT_BYTES:
            found: BaseModel | Ignored = Ignored("oversized", location, (
                f"{location} is larger than {MAX_REPORT_BYTES} bytes, too large for a {noun}; ignored"))
        else:
            found = check(data, uid, model, location, noun)
        if isinstance(found, Ignored):
            # Logged once per object and cause (a job's report and pre-flight result share its output URI).
            self._warn_once(output_uri, f"{name}:{found.cause}", found.message, "the status keeps its previous values")
            return found
        with self._lock:
            self._warned.pop(output_uri, None)
        return found

    def _warn_once(self, uri: str, kind: str, message: str,
                   then: str = "status shows the Job only until the report can be read") -> None:
        with self._lock:
            kinds = self._warned.setdefault(uri, set())
            if kind in kinds:
                return
            kinds.add(kind)
        log.warning("%s; %s", message, then)


def check(data: bytes, uid: str, model: type[BaseModel], location: str = "the object",
          noun: str = "report") -> BaseModel | Ignored:
    """`data` (at most MAX_REPORT_BYTES, read from `location`) as a `model` of the FineTuneJob `uid`, or why it
    is ignored: its owner (`jobUid`) is checked before its content, so the message about another job's
    object tells nothing of what is in it. Pure."""
    try:
        doc = pydantic_core.from_json(data)
    except ValueError as err:
        return Ignored("invalid", location, f"{location} is not a valid {noun}: not JSON ({err}); ignored")
    if not isinstance(doc, dict):
        return Ignored("invalid", location, f"{location} is not a valid {noun}: not a JSON object; ignored")
    owner = doc.get(UID_KEY)
    if owner is None or owner == "":
        return Ignored("unowned", location, (
            f"{location} names no FineTuneJob (it has no {UID_KEY}: written by a trainer image older than this "
            f"operator, or not by a trainer); ignored"))
    if owner != uid:
        return Ignored("foreign", location, (
            f"{location} was written for another FineTuneJob (its {UID_KEY} is not this job's uid {uid}); "
            f"ignored (is spec.output.uri this job's own?)"))
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        where_bad = ".".join(str(p) for p in first["loc"]) or "(document)"
        return Ignored("invalid", location, f"{location} is not a valid {noun}: {where_bad}: {first['msg']}; ignored")
