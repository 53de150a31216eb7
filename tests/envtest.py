"""A real Kubernetes control plane for tests, as controller-runtime's envtest provides one.

When `KUBEBUILDER_ASSETS` names a folder holding `etcd`, `kube-apiserver` and `kube-controller-manager`
(what `setup-envtest use -p path` prints, or this repository's `../shared/envtest/`), `ControlPlane`
starts the three on loopback with a throwaway PKI (a CA, the API server's serving certificate, client
certificates for an admin and for the controller manager, a service-account key pair), free ports and a
kubeconfig; waits for `/readyz` and for the `default` ServiceAccount (the point from which pods can be
created); and stops them again, also when a test fails or the run is interrupted: each process gets
SIGTERM when the Python process that started it dies (`PR_SET_PDEATHSIG`), and `stop()` runs from the
pytest fixture's teardown and from `atexit`.

There is no kubelet and no scheduler: pods stay Pending (the product's pods run on a real node in
tests/node). The controller manager runs every controller (Job, garbage collector, namespace, service
account, node lifecycle, ...).

By hand, for a shell against a fresh control plane::

    KUBEBUILDER_ASSETS=../shared/envtest .venv/bin/python -m tests.envtest
    # prints `export KUBECONFIG=...`; Ctrl-C stops it
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ENV_ASSETS = "KUBEBUILDER_ASSETS"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
HOST = "127.0.0.1"
#: What a skipped real-API test says: how to get a control plane.
HOW_TO_GET_ONE = (
    "needs a real Kubernetes API server: set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver and "
    "kube-controller-manager (`setup-envtest use -p path`, or ../shared/envtest in this repository's "
    "workspace), or run `KUBECONFIG=... pytest --e2e` against a kind or k3s cluster (tests/e2e/README.md)"
)


def assets_dir(env: dict[str, str] | None = None) -> Path | None:
    """The folder `KUBEBUILDER_ASSETS` names, if it holds all three binaries; else None.

    A set variable that names an incomplete folder is an error, not a silent skip."""
    raw = ((env if env is not None else os.environ).get(ENV_ASSETS) or "").strip()
    if not raw:
        return None
    folder = Path(raw).expanduser().resolve()
    missing = [name for name in BINARIES if not os.access(folder / name, os.X_OK)]
    if missing:
        raise RuntimeError(f"{ENV_ASSETS}={raw} lacks executable {', '.join(missing)}; {HOW_TO_GET_ONE}")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- the throwaway PKI -----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


@dataclass
class Pki:
    """Files of a CA, its serving and client certificates, and the service-account key pair."""

    dir: Path

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self._not_after = now + dt.timedelta(days=2)
        self._now = now
        self.ca_key = _key()
        ca_name = _name("finetune-envtest-ca")
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.crt", _pem_cert(self.ca_cert))
        self.ca_key_file = self._write("ca.key", _pem_key(self.ca_key))
        self.serving = self.issue("serving", "kube-apiserver", server=True)
        self.admin = self.issue("admin", "finetune-envtest-admin", organization="system:masters")
        self.controller_manager = self.issue("kube-controller-manager", "system:kube-controller-manager")
        # Service-account tokens are signed with RSA, which every consumer of them verifies.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = self._write("sa.key", _pem_key(sa_key))
        self.sa_pub = self._write("sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(self, stem: str, common_name: str, *, organization: str | None = None,
              server: bool = False) -> tuple[Path, Path]:
        """A certificate signed by the CA: (cert file, key file)."""
        key = _key()
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name, organization))
            .issuer_name(self.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default.svc"),
                x509.IPAddress(ipaddress.ip_address(HOST)), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            ]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return self._write(f"{stem}.crt", _pem_cert(cert)), self._write(f"{stem}.key", _pem_key(key))


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
        "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user, "namespace": "default"}}],
    }


# --- the processes ---------------------------------------------------------------------------------


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, before any fork: loading a library between fork and exec in a threaded process can deadlock.
_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: SIGTERM this child when the process that started it dies, even by SIGKILL (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on loopback; `start()`, `stop()` or `with`."""

    def __init__(self, assets: Path, workdir: Path | None = None, *, timeout: float = 120.0,
                 extra_apiserver_args: list[str] | None = None):
        """`extra_apiserver_args` are appended to kube-apiserver's arguments (e.g. an audit policy and log)."""
        self.assets = assets
        self.extra_apiserver_args = list(extra_apiserver_args or ())
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="envtest-")) if workdir is None else workdir
        self.timeout = timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.kubeconfig_path = self.dir / "kubeconfig"
        self.server = ""
        self.started_seconds = 0.0
        self._stopped = False

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.log_path(name), "wb") as sink:
            self.processes[name] = subprocess.Popen(
                [str(self.assets / name), *args], stdin=subprocess.DEVNULL, stdout=sink,
                stderr=subprocess.STDOUT, cwd=self.dir, preexec_fn=die_with_parent,
            )

    def _check_running(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} while the control plane started; "
                    f"log tail ({self.log_path(name)}):\n{self.log_tail(name)}")

    def _wait(self, what: str, check: Any, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(OSError, urllib.error.URLError, ssl.SSLError, ValueError):
                if check():
                    return
            time.sleep(0.2)
        tails = "\n".join(f"--- {n} ---\n{self.log_tail(n, 15)}" for n in self.processes)
        raise ControlPlaneError(f"timed out after {self.timeout:.0f}s waiting for {what}\n{tails}")

    #: Starts tried when a port `free_port` picked was taken before the process bound it (the picked port is
    #: released first, and an outgoing connection's ephemeral port, e.g. kube-apiserver's own to etcd, can land
    #: on it): "address already in use" in a log, seen once in CI.
    PORT_ATTEMPTS = 3

    def start(self) -> ControlPlane:
        started = time.monotonic()
        deadline = started + self.timeout
        atexit.register(self.stop)
        self.pki = Pki(self.dir / "pki")
        for attempt in range(1, self.PORT_ATTEMPTS + 1):
            try:
                self._start(deadline)
                break
            except ControlPlaneError as err:
                taken = any("address already in use" in self.log_tail(name) for name in self.processes)
                if not taken or attempt == self.PORT_ATTEMPTS:
                    raise
                print(f"envtest: a port was taken before it was bound ({err.args[0].splitlines()[0]}); "
                      "starting again on other ports", file=sys.stderr)
                self._terminate()
                self.processes = {}
                shutil.rmtree(self.dir / "etcd", ignore_errors=True)
        self.started_seconds = time.monotonic() - started
        return self

    def _start(self, deadline: float) -> None:
        pki = self.pki
        etcd_port, peer_port, api_port, kcm_port = free_port(), free_port(), free_port(), free_port()
        etcd_url = f"http://{HOST}:{etcd_port}"
        self._spawn("etcd", [
            "--data-dir", str(self.dir / "etcd"), "--listen-client-urls", etcd_url,
            "--listen-peer-urls", f"http://{HOST}:{peer_port}", "--unsafe-no-fsync",
        ])
        self.server = f"https://{HOST}:{api_port}"
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", f"--bind-address={HOST}", f"--advertise-address={HOST}",
            f"--secure-port={api_port}", f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving[0]}", f"--tls-private-key-file={pki.serving[1]}",
            f"--client-ca-file={pki.ca}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
            "--authorization-mode=RBAC", "--allow-privileged=true", *self.extra_apiserver_args,
        ])
        admin = kubeconfig(self.server, pki.ca, *pki.admin, user="admin")
        self.kubeconfig_path.write_text(yaml.safe_dump(admin))
        self.kubeconfig_path.chmod(0o600)
        self._context = ssl.create_default_context(cafile=str(pki.ca))
        self._context.load_cert_chain(str(pki.admin[0]), str(pki.admin[1]))
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz", raw=True) == "ok", deadline)

        kcm_config = self.dir / "kube-controller-manager.kubeconfig"
        kcm_config.write_text(yaml.safe_dump(kubeconfig(self.server, pki.ca, *pki.controller_manager,
                                                        user="system:kube-controller-manager")))
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kcm_config}", f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}", f"--bind-address={HOST}",
            f"--secure-port={kcm_port}", f"--cert-dir={self.dir / 'kcm-certs'}", "--controllers=*",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca}", f"--cluster-signing-cert-file={pki.ca}",
            f"--cluster-signing-key-file={pki.ca_key_file}", "--leader-elect=false",
        ])
        self._wait("the default ServiceAccount (the controller manager's service-account controller)",
                   lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") is not None, deadline)

    def _terminate(self) -> None:
        """SIGTERM every process (controller manager first), SIGKILL what is left after 10 s."""
        for name in reversed(list(self.processes)):
            with contextlib.suppress(ProcessLookupError):
                self.processes[name].terminate()
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _get(self, path: str, raw: bool = False) -> Any:
        try:
            with urllib.request.urlopen(self.server + path, context=self._context, timeout=5) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        return text if raw else json.loads(text)

    def stop(self) -> None:
        """SIGTERM all (controller manager first), SIGKILL what is left after 10 s; remove the workdir."""
        if self._stopped:
            return
        self._stopped = True
        self._terminate()
        if self._own_dir and os.environ.get("FT_ENVTEST_KEEP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    assets = assets_dir()
    if assets is None:
        print(HOW_TO_GET_ONE)
        return 2
    with ControlPlane(assets) as plane:
        print(f"control plane ready in {plane.started_seconds:.1f}s: {plane.server}")
        print(f"export KUBECONFIG={plane.kubeconfig_path}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
