"""Experiment tracking of a training run: TensorBoard event files always, MLflow with spec.tracking.mlflow.

Only the process of global rank 0 tracks (`start` hands the others an inert tracker). `train.Run` calls it
at a few points: `start` once the data is read, `metric` for every line of metrics.jsonl (loss,
learning_rate, tokens_per_second per step; eval_loss at checkpoints), `checkpoint` after every complete
checkpoint, `stage_tensorboard` while the artifacts are staged, `finish` once they are published, and
`abandon` (entrypoint) when the run fails.

TensorBoard: one event file per attempt under the rank's work directory, uploaded to
`<output.uri>/tensorboard/` at every checkpoint and with the artifacts (then listed in the `_COMPLETE`
manifest and in status.artifacts as `tensorboard`). A resumed attempt first downloads the earlier attempts'
files, and opens its writer with `purge_step` at its first step, so TensorBoard drops what an earlier
attempt logged after the checkpoint resumed from (those steps are trained again).

MLflow (the public `MlflowClient` API, no global run state): the experiment (`experiment`, default
`<namespace>/<name>`) is created when missing; the run is created once and its id kept at
`<output.uri>/STATE_KEY`, so a restarted pod or a resumed run logs to the same run. Params are the config
snapshot flattened (`params`) of the attempt that created the run: MLflow refuses to change a param, and the
operator adds out-of-memory adjustments to later pods' snapshots. Until they (and the whole snapshot, as the
run's artifact `finetune/config.json`) went up, the state object keeps that snapshot and what is unsent, and
they are sent again when a failed server is retried and when a later attempt reopens the run (the same
values again, which MLflow accepts). Per-step metrics go up in `log_batch` requests at logging steps and
checkpoints; the evaluation before/after as `base.<score>`/`tuned.<score>`; the artifacts' URIs as tags.
Every reopen of the run by a restarted pod tags it `finetune.dev/resumed-from-step` with the checkpoint step
the attempt resumes from (0: none, trained from the start): MLflow keeps the values a crashed attempt logged
for steps past its last checkpoint, so a metric's history then holds two values for those steps (the newer
ones from this attempt); TensorBoard purges them (above), MLflow cannot. A main run (not the pilot) whose
gates passed adds a version to `registeredModel` whose source is `merged/` (when saved) or `model/`, tagged
with its lineage (`lineage_tags`).

Failures never fail training: every MLflow call is caught, logged as a warning and recorded in the report
(`tracking.error`, which the operator turns into the `Tracking` condition and a Warning event). A server that
failed is not called again until a checkpoint RETRY_SECONDS later (and at the end of the run); metrics wait in
a bounded buffer meanwhile, and the error clears once the server answers again. The HTTP client's retries are
bounded (`HTTP_DEFAULTS`; MLflow's own defaults retry with backoff for minutes): the call that meets the
failure costs about 2 s against a closed port (refused at once, 3 tries with backoff), but about 33 s when
the connection is silently dropped (a NetworkPolicy dropping egress: 3 tries of a 10 s timeout, plus backoff)
or the server accepts connections and never answers, all on rank 0 while the other ranks wait in their next
collective. Later calls of the run are skipped, and each retry first probes the server's host and port over
TCP (PROBE_SECONDS, 3 s at most; not through an HTTP proxy): a server still unreachable costs at most that per
retry, one that accepts connections but does not answer up to the 33 s again. The snapshot artifact is best
effort (the server's artifact store may be one the trainer cannot write: a warning, tried again when a later
attempt reopens the run or a failed server is retried). Credentials are MLflow's own
environment variables (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN), which the operator
projects from spec.tracking.mlflow.secretRef; nothing here reads or logs them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import EvaluationStatus, MlflowSpec, TrackingStatus

if TYPE_CHECKING:
    from finetune_trainer.runtypes import RunContext as Run

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
#: Where the MLflow run's identity is kept, next to the report (survives pod restarts).
STATE_KEY = "status/tracking.json"
#: Metrics of a metrics.jsonl line that are tracked (the others, step/epoch/tokens, are not scalars to chart).
STEP_METRICS = ("loss", "eval_loss", "learning_rate", "tokens_per_second",
                # objective dpo (loop.py): the step's pairs against the reference, and the validation pairs'
                "preference_accuracy", "reward_margin", "eval_preference_accuracy", "eval_reward_margin")
#: MLflow's HTTP client defaults are 7 retries with a backoff factor of 2 and a 120 s timeout: minutes per call
#: against a server that is down. Bounded for this process unless the environment sets them already.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: MLflow's limits (mlflow.utils.validation): param values, keys, and entities per log_batch request.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
#: Metrics kept for a server that is down (the oldest are dropped beyond it): about 2,500 steps.
MAX_BUFFERED = 10_000
MAX_ERROR = 2048
#: A server that failed is tried again at the first checkpoint this long after the failure (and at the end).
RETRY_SECONDS = 60.0
#: Before such a retry calls MLflow, a TCP connection to the tracking server's host and port must open within
#: this: a dropped connection then costs this, not MLflow's retries of a 10 s request timeout (~33 s).
PROBE_SECONDS = 3.0
#: The tag a reopened run gets: the checkpoint step the attempt that reopened it resumes from.
RESUMED_TAG = "finetune.dev/resumed-from-step"
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
#: Config fields not logged: the rendezvous id is the key to the job's c10d store (contract.TrainerConfig).
_SECRET_FIELDS = ("rendezvousId",)


# --- pure helpers ----------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1, "c": [1, 2]}}` -> `{"a.b": "1", "a.c": "[1, 2]"}`: nested objects joined with dots,
    lists and scalars as JSON (strings as they are)."""
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, str):
        return {prefix: obj}
    return {prefix: json.dumps(obj, sort_keys=True)}


def _key(name: str) -> str:
    """A valid MLflow key (letters, digits, `_-. /`; at most MAX_KEY characters)."""
    return _KEY_CHARS.sub("_", name)[:MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def snapshot(config: TrainerConfig) -> dict[str, Any]:
    """The resolved config snapshot as tracked (without the secret fields)."""
    return {k: v for k, v in config.wire().items() if k not in _SECRET_FIELDS}


def snapshot_params(snap: Mapping[str, Any]) -> dict[str, str]:
    """A snapshot (`snapshot`) as MLflow params: flattened, values cut to MLflow's limit (the whole snapshot
    is in provenance.json, whose URI is the run's `artifact.provenance` tag)."""
    return {_key(k): _truncate(v, MAX_PARAM_VALUE) for k, v in sorted(flatten(snap).items())}


def params(config: TrainerConfig) -> dict[str, str]:
    """The resolved config snapshot as MLflow params (`snapshot_params`)."""
    return snapshot_params(snapshot(config))


def experiment_name(config: TrainerConfig, spec: MlflowSpec) -> str:
    return spec.experiment or f"{config.namespace}/{config.name}"


def run_name(config: TrainerConfig) -> str:
    return f"{config.name}-{config.stage}" if config.stage else config.name


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def step_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The tracked scalars of a metrics.jsonl line (finite numbers only)."""
    out = {}
    for name in STEP_METRICS:
        value = record.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            out[name] = float(value)
    return out


def evaluation_metrics(evaluation: EvaluationStatus | None) -> dict[str, float]:
    """Scores before and after: `base.accuracy`, `tuned.accuracy`, ...; with retrieval also
    `retrieval.base.*` and `retrieval.tuned.*`."""
    if evaluation is None:
        return {}
    sides: dict[str, Any] = {"base": evaluation.base, "tuned": evaluation.tuned}
    if evaluation.with_retrieval is not None:
        sides.update({"retrieval.base": evaluation.with_retrieval.base,
                      "retrieval.tuned": evaluation.with_retrieval.tuned})
    return {f"{side}.{name}": float(value) for side, scores in sides.items()
            for name, value in scores.model_dump(exclude_none=True).items()
            if isinstance(value, int | float)}


def model_source(uris: Mapping[str, str]) -> str | None:
    """What a registered version points at: the merged model when saved, else model/ (adapter or weights)."""
    return uris.get("merged") or uris.get("model")


def lineage_tags(config: TrainerConfig, provenance: Mapping[str, Any], *, gpu_hours: float,
                 gates_passed: bool) -> dict[str, str]:
    """Tags of a registered model version: where it came from and what it passed."""
    base = provenance.get("baseModel") or {}
    data = provenance.get("data") or []
    files = {str(entry.get("uri") or entry.get("name")): str(entry.get("sha256")) for entry in data}
    train = next((entry for entry in data if entry.get("uri") == config.spec.dataset.train), None)
    gates = [g.wire() for g in config.spec.evaluation.gates]
    tags = {
        "base_model.uri": config.spec.base_model.resolved_uri(),
        "base_model.revision": config.spec.base_model.revision or "unpinned",
        "base_model.files_sha256": str(base.get("filesSha256") or ""),
        "dataset.sha256": str((train or {}).get("sha256") or ""),
        "dataset.files_sha256": json.dumps(files, sort_keys=True),
        "method": config.method,
        "gpu_hours": f"{gpu_hours:.6g}",
        "gates.passed": str(gates_passed).lower(),
        "gates": json.dumps(gates, sort_keys=True),
        "config_sha256": str(provenance.get("configSha256") or ""),
        "finetunejob.namespace": config.namespace,
        "finetunejob.name": config.name,
        "finetunejob.uid": config.uid or "",
    }
    return {k: v for k, v in tags.items() if v != ""}


def probe_address(tracking_uri: str) -> tuple[str, int] | None:
    """The host and port a TCP probe of the tracking server connects to; None when there is nothing to probe
    (not http(s), or the requests go through an HTTP proxy, whose reachability says nothing of the server's)."""
    parsed = urllib.parse.urlsplit(tracking_uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return None
    proxies = urllib.request.getproxies()
    if parsed.scheme in proxies and not urllib.request.proxy_bypass(parsed.hostname):
        return None
    return parsed.hostname, port


def reachable(tracking_uri: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the tracking server opens within `timeout` (True when not probed)."""
    address = probe_address(tracking_uri)
    if address is None:
        return True
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _error(what: str, uri: str, err: BaseException) -> str:
    text = f"spec.tracking.mlflow.trackingUri {uri}: {what} failed: {type(err).__name__}: {err}"
    return _truncate(" ".join(text.split()), MAX_ERROR - 120) + (
        "; training goes on, and tracking is tried again later")


# --- TensorBoard -----------------------------------------------------------------------------------


class TensorBoard:
    """This attempt's event file, next to the earlier attempts' (downloaded), uploaded at checkpoints."""

    def __init__(self, run: Run):
        self.store = run.store
        self.dir = run.work / TENSORBOARD_DIR
        self._writer: Any = None
        self._last_step = 0
        self._at_last: set[str] = set()  # scalars written at _last_step
        self._uploaded: dict[str, int] = {}  # file name -> size uploaded
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        try:
            if self.store.list(TENSORBOARD_DIR + "/"):
                self.store.download_prefix(TENSORBOARD_DIR, self.dir)
                self._uploaded = {p.name: p.stat().st_size for p in self.dir.iterdir() if p.is_file()}
        except Exception as err:
            log.warning("could not download the earlier TensorBoard event files from %s: %s",
                        self.store.child(TENSORBOARD_DIR), err)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        repeated = step < self._last_step or (step == self._last_step and not self._at_last.isdisjoint(values))
        if repeated and self._writer is not None:
            # A fresh attempt one rung lower (oom.Ladder) trains these steps again: a new file that purges them.
            self._writer.close()
            self._writer = None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what earlier files logged at this step and later.
            self._writer = SummaryWriter(log_dir=str(self.dir), purge_step=step)
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        if step != self._last_step:
            self._last_step, self._at_last = step, set()
        self._at_last.update(values)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def upload(self) -> None:
        """Upload the event files that changed since the last upload (best effort)."""
        self.flush()
        try:
            for path in sorted(self.dir.iterdir()):
                size = path.stat().st_size
                if path.is_file() and self._uploaded.get(path.name) != size:
                    self.store.upload_file(path, f"{TENSORBOARD_DIR}/{path.name}")
                    self._uploaded[path.name] = size
        except Exception as err:
            log.warning("could not upload the TensorBoard event files to %s: %s",
                        self.store.child(TENSORBOARD_DIR), err)

    def stage(self, stage: Path) -> bool:
        """Copy every event file into the artifacts' staging directory; False when there are none."""
        self.flush()
        files = [p for p in self.dir.iterdir() if p.is_file()]
        if not files:
            return False
        (stage / TENSORBOARD_DIR).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy(path, stage / TENSORBOARD_DIR / path.name)
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- MLflow ----------------------------------------------------------------------------------------


class Mlflow:
    """One MLflow run of this training run, reused across attempts."""

    def __init__(self, run: Run, spec: MlflowSpec):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient

        self.run = run
        self.spec = spec
        self.uri = spec.tracking_uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.status = TrackingStatus()
        self.run_id: str | None = None
        self.down = False
        self._failed_at = 0.0
        self._buffer: list[Any] = []
        # The snapshot the run was created with, while its params or artifact are unsent ("params",
        # "snapshot"); kept in the state object too, so that a later attempt sends them (`_send_config`).
        self._snapshot: dict[str, Any] | None = None
        self._unsent: set[str] = set()
        self._resumed_from = self._resume_step()

    # -- failures ----------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any) -> Any:
        """fn(), or None after recording the failure (the server is then left alone until `retry`)."""
        if self.down:
            return None
        try:
            return fn()
        except Exception as err:
            self._failed(what, err)
            return None

    def _failed(self, what: str, err: BaseException) -> None:
        message = _error(what, self.uri, err)
        log.warning("MLflow: %s", message)
        self.down, self._failed_at = True, time.monotonic()
        self._set(error=message)

    def _set(self, **fields: Any) -> None:
        status = self.status.model_copy(update=fields)
        if status != self.status:
            self.status = status
            self.run.reporter.update(tracking=status)

    def retry(self, *, now: bool = False) -> None:
        """Try a server that failed once more: at checkpoints RETRY_SECONDS after the failure, and at the end
        (`now`). A server whose port does not open within PROBE_SECONDS is left alone until the next retry;
        otherwise the run is opened (or what is unsent of its config sent) and the buffered metrics flushed."""
        if not self.down or (not now and time.monotonic() - self._failed_at < RETRY_SECONDS):
            return
        if not reachable(self.uri):
            log.warning("MLflow: %s still does not accept connections; tried again later", self.uri)
            self._failed_at = time.monotonic()
            return
        self.down = False
        run_id = self.run_id
        if run_id is None:
            self.open()
        else:
            if not self._buffer and "params" not in self._unsent:
                # Nothing else to send first: ask for the run, so the error clears only on an answer.
                self._call("reaching the run", lambda: self.client.get_run(run_id))
            self._send_config()
        if self.run_id is not None and not self.down and self.flush():
            self._set(error=None)

    # -- the run -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Find the run kept at STATE_KEY (same server, same job) or create one with the params."""
        config, store = self.run.requested, self.run.store
        kept: dict[str, Any] = {}
        try:
            if store.exists(STATE_KEY):
                kept = store.read_json(STATE_KEY)
        except Exception as err:
            log.warning("could not read %s: %s", store.child(STATE_KEY), err)
        if kept.get("trackingUri") == self.uri and kept.get("jobUid") == config.uid and kept.get("runId"):
            from mlflow.exceptions import MlflowException

            try:
                self.client.update_run(kept["runId"], status="RUNNING")
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # else deleted on the server: a new run
                    self._failed(f"reopening run {kept['runId']}", err)
                    return
            except Exception as err:
                self._failed(f"reopening run {kept['runId']}", err)
                return
            else:
                self._opened(str(kept["experimentId"]), kept["runId"], kept.get("modelVersion"))
                unsent = set(kept.get("unsent") or ()) & {"params", "snapshot"}
                if unsent and isinstance(kept.get("snapshot"), dict):
                    self._snapshot, self._unsent = kept["snapshot"], unsent
                if self._resumed_from is not None:  # duplicated steps after a crash are explained by this
                    self.tags({RESUMED_TAG: str(self._resumed_from)})
                self._send_config()
                return
        name = experiment_name(config, self.spec)
        experiment_id = self._call(f"finding experiment {name!r}", lambda: self._experiment(name))
        if experiment_id is None:
            return
        tags = {"finetune.dev/namespace": config.namespace, "finetune.dev/name": config.name,
                "finetune.dev/uid": config.uid or "", "finetune.dev/method": config.method,
                "finetune.dev/stage": config.stage or "main", "finetune.dev/output": self.run.output_uri}
        created = self._call("creating the run", lambda: self.client.create_run(
            experiment_id, run_name=run_name(config), tags={k: v for k, v in tags.items() if v}))
        if created is None:
            return
        run_id = created.info.run_id
        self._opened(experiment_id, run_id, None)
        self._snapshot, self._unsent = snapshot(config), {"params", "snapshot"}
        self._save_state()  # with the snapshot: a later attempt sends what this one could not
        self._send_config()

    def _send_config(self) -> None:
        """Send what is unsent of the snapshot the run was created with: its params (the run's config; the
        same values again when an earlier try sent part of them) and the whole snapshot as the run's artifact
        `finetune/config.json` (params cut long values). The artifact goes to the server's artifact store,
        which may be one the trainer cannot write to: a warning, not a failure (tried again on a reopen or retry)."""
        run_id, snap = self.run_id, self._snapshot
        if run_id is None or self.down or not self._unsent or snap is None:
            return
        before = set(self._unsent)
        if "params" in self._unsent:
            if not self.log_params(snapshot_params(snap)):
                return  # the server failed: kept for `retry` (the state already says so)
            self._unsent.discard("params")
        if "snapshot" in self._unsent:
            try:
                self.client.log_dict(run_id, snap, "finetune/config.json")
            except Exception as err:
                log.warning("MLflow: could not store the config snapshot as an artifact of run %s: %s", run_id,
                            err)
            else:
                self._unsent.discard("snapshot")
        if not self._unsent:
            self._snapshot = None
        if self._unsent != before:
            self._save_state()

    def _resume_step(self) -> int | None:
        """The checkpoint step this attempt resumes from (0: none), as train.Run finds it; None when the
        output cannot be read (the tag is then left out)."""
        from finetune_trainer import checkpoint as ckpt

        try:
            return ckpt.latest_complete(self.run.store) or 0
        except Exception as err:
            log.warning("could not list the checkpoints under %s: %s", self.run.output_uri, err)
            return None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:
            found = self.client.get_experiment_by_name(name)  # created meanwhile by another job
            if found is None:
                raise
            return str(found.experiment_id)

    def _opened(self, experiment_id: str, run_id: str, version: str | None) -> None:
        self.run_id = run_id
        self._set(run_id=run_id, experiment_id=experiment_id, run_url=run_url(self.uri, experiment_id, run_id),
                  registered_model=self.spec.registered_model if version else None, model_version=version,
                  error=None)
        log.info("MLflow run %s", self.status.run_url)

    def _save_state(self) -> None:
        state: dict[str, Any] = {
            "trackingUri": self.uri, "jobUid": self.run.requested.uid, "experimentId": self.status.experiment_id,
            "runId": self.run_id, "modelVersion": self.status.model_version, "unsent": sorted(self._unsent)}
        if self._unsent:
            state["snapshot"] = self._snapshot
        try:
            self.run.store.write_json(STATE_KEY, state)
        except Exception as err:
            log.warning("could not write %s: %s", self.run.store.child(STATE_KEY), err)

    def _send(self, what: str, items: list[Any], size: int, kind: str) -> bool:
        """log_batch(`kind`=items) in requests of at most `size`; False when one failed (the rest is not sent)."""
        run_id = self.run_id
        if run_id is None or self.down:
            return False
        for i in range(0, len(items), size):
            batch = items[i:i + size]
            self._call(what, lambda b=batch: self.client.log_batch(run_id, **{kind: b}))
            if self.down:
                return False
        return True

    def log_params(self, values: Mapping[str, str]) -> bool:
        """True when every param went up."""
        from mlflow.entities import Param

        return self._send("logging params", [Param(k, v) for k, v in values.items()], MAX_PARAMS_PER_BATCH,
                          "params")

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Buffer metrics at `step` (sent by `flush`)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._buffer.extend(Metric(k, v, stamp, step) for k, v in values.items())
        del self._buffer[:-MAX_BUFFERED]

    def flush(self) -> bool:
        """Send the buffered metrics (kept when the server failed); True when they all went."""
        sent = self._send("logging metrics", self._buffer, MAX_METRICS_PER_BATCH, "metrics")
        if sent:
            self._buffer.clear()
        return sent

    def tags(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_key(k), _truncate(v, MAX_TAG_VALUE)) for k, v in values.items()]
        self._send("logging tags", items, MAX_PARAMS_PER_BATCH, "tags")

    def end(self, status: str) -> None:
        run_id = self.run_id
        if run_id is not None:
            self._call("ending the run", lambda: self.client.set_terminated(run_id, status=status))

    def register(self, source: str, tags: Mapping[str, str]) -> None:
        """A new version of spec.registeredModel (created when missing) with `source` and the lineage tags."""
        name, run_id = self.spec.registered_model, self.run_id
        if name is None or run_id is None or self.status.model_version is not None:
            return

        def create() -> Any:
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.client.create_registered_model(
                    name, description="Fine-tuned by finetune-operator (FineTuneJob); versions carry their lineage tags.")
            return self.client.create_model_version(
                name, source, run_id=run_id, tags=dict(tags), await_creation_for=0,
                description=f"FineTuneJob {self.run.requested.namespace}/{self.run.requested.name}, "
                            f"{self.run.requested.method}: {source}")

        version = self._call(f"registering a version of {name!r}", create)
        if version is not None:
            self._set(registered_model=name, model_version=str(version.version))
            self._save_state()
            log.info("registered %s version %s (%s)", name, version.version, source)


# --- what train.Run calls -----------------------------------------------------------------------------


class Tracker:
    """The tracking of one training run (rank 0); every method is best effort and never raises."""

    def __init__(self, run: Run):
        from finetune_trainer.report import log_every

        self.run = run
        self._log_every = log_every
        self.tensorboard = TensorBoard(run)
        mlflow_spec = run.requested.spec.tracking.mlflow if run.requested.spec.tracking else None
        self.mlflow: Mlflow | None = None
        if mlflow_spec is not None:
            try:
                self.mlflow = Mlflow(run, mlflow_spec)
                self.mlflow.open()
            except Exception as err:  # the client itself (import, configuration)
                log.warning("MLflow tracking is off: %s", err)
                run.reporter.update(tracking=TrackingStatus(error=_error("starting", mlflow_spec.tracking_uri, err)))
                self.mlflow = None

    def metric(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl line: TensorBoard now, MLflow at logging steps and checkpoints."""
        values = step_metrics(record)
        step = int(record.get("step") or 0)
        if not values:
            return
        try:
            total = self.run.state.total_steps
            logging_step = step % self._log_every(total) == 0 or step >= total
            if logging_step and "loss" in values:
                values["gpu_hours"] = self.run.gpu_hours()
            self.tensorboard.scalars(step, values)
            if self.mlflow is not None:
                self.mlflow.metrics(values, step)
                if logging_step or "eval_loss" in values:
                    self.mlflow.flush()
        except Exception as err:
            log.warning("tracking step %d: %s", step, err)

    def checkpoint(self) -> None:
        """After a complete checkpoint: event files up, and a server that failed is tried again."""
        try:
            self.tensorboard.upload()
            if self.mlflow is not None:
                self.mlflow.retry()
                self.mlflow.flush()
        except Exception as err:
            log.warning("tracking at the checkpoint: %s", err)

    def stage_tensorboard(self, stage: Path) -> bool:
        try:
            return self.tensorboard.stage(stage)
        except Exception as err:
            log.warning("could not stage the TensorBoard event files: %s", err)
            return False

    def finish(self, evaluation: EvaluationStatus | None, uris: Mapping[str, str], *, passed: bool) -> None:
        """After the artifacts are published: scores, artifact URIs, GPU-hours, the run's end, and a
        registered version when the gates passed (main runs only)."""
        self.tensorboard.close()
        if self.mlflow is None:
            return
        try:
            self._finish_mlflow(self.mlflow, evaluation, uris, passed)
        except Exception as err:
            log.warning("MLflow at the end of the run: %s", err)

    def _finish_mlflow(self, mlflow: Mlflow, evaluation: EvaluationStatus | None, uris: Mapping[str, str],
                       passed: bool) -> None:
        run = self.run
        mlflow.retry(now=True)
        gpu_hours = run.gpu_hours()
        scores = evaluation_metrics(evaluation)
        mlflow.metrics({k: v for k, v in scores.items() if k.startswith(("base.", "retrieval.base."))}, 0)
        mlflow.metrics({**{k: v for k, v in scores.items() if not k.startswith(("base.", "retrieval.base."))},
                        "gpu_hours": gpu_hours}, run.state.step)
        mlflow.flush()
        mlflow.tags({**{f"artifact.{kind}": uri for kind, uri in uris.items()},
                     "gates.passed": str(passed).lower(), "gpu_hours": f"{gpu_hours:.6g}"})
        source = model_source(uris)
        if passed and run.requested.stage != "pilot" and source is not None and mlflow.spec.registered_model:
            provenance: dict[str, Any] = {}
            try:
                from finetune_trainer.artifacts import PROVENANCE_KEY

                provenance = run.store.read_json(PROVENANCE_KEY)
            except Exception as err:
                log.warning("lineage without provenance.json: %s", err)
            mlflow.register(source, lineage_tags(run.requested, provenance, gpu_hours=gpu_hours, gates_passed=passed))
        mlflow.end("FINISHED" if passed else "FAILED")

    def abandon(self, failed: bool) -> None:
        """The run stops early: metrics flushed, event files up, the MLflow run FAILED (for good) or KILLED
        (preempted or crashed: the Job starts it again, and the next attempt reopens it)."""
        try:
            self.tensorboard.upload()
            self.tensorboard.close()
            if self.mlflow is not None:
                self.mlflow.flush()
                self.mlflow.end("FAILED" if failed else "KILLED")
        except Exception as err:
            log.warning("tracking at the end of a failed run: %s", err)


class _Inert:
    """Ranks other than 0 track nothing."""

    def metric(self, record: Mapping[str, Any]) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def stage_tensorboard(self, stage: Path) -> bool:
        return False

    def finish(self, evaluation: Any, uris: Mapping[str, str], *, passed: bool) -> None:
        pass

    def abandon(self, failed: bool) -> None:
        pass


def start(run: Run) -> Tracker | _Inert:
    """The tracker of `run` (an inert one except on rank 0)."""
    if not run.accelerator.is_main_process:
        return _Inert()
    return Tracker(run)


def abandon(run: Any, err: BaseException) -> None:
    """For the entrypoint: `run` failed with `err`, for good when its exit code is not retried (the
    podFailurePolicy's EXIT_CONFIG_ERROR and EXIT_GATES_FAILED), else it is preempted or crashed."""
    from finetune_operator.contract import EXIT_CONFIG_ERROR, EXIT_GATES_FAILED

    tracker = getattr(run, "tracker", None)
    if tracker is not None:
        tracker.abandon(failed=getattr(err, "exit_code", 1) in (EXIT_CONFIG_ERROR, EXIT_GATES_FAILED))
