"""tests/kube.py, the API-server tests' client, without a cluster: it authenticates as the kubeconfig says
(token, token file, basic auth, an exec plugin and its refresh), picks the kubeconfig file and context as
kubectl does, uses the service account in a pod without a kubeconfig, and raises ConnectionError when
nothing answers. The server is kmock's KubernetesEmulator over real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest

from tests.kube import Kube


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture()
def emulator() -> Iterator[tuple[Any, Kube]]:
    """kmock's KubernetesEmulator on a loopback port, served from its own thread and event loop."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            k8s.resources["v1/pods"] = kmock.ResourceInfo()
            state.update(k8s=k8s, url=str(server.url), stop=stop, loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "kmock did not start"
    try:
        yield state["k8s"], Kube.from_url(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None,
                     other_user: dict[str, Any] | None = None) -> Path:
    """A kubeconfig whose current context `dev` uses `user`; context `other` (same server) `other_user`."""
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}, {"name": "o", "user": other_user or {}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "c", "user": "o"}}],
    }))
    return path


def exec_plugin(tmp_path: Path, expiry: str = "2999-01-01T00:00:00Z") -> dict[str, Any]:
    """A kubeconfig exec user whose plugin answers token `gen-<n>` on its n-th run."""
    calls = tmp_path / "calls"
    script = (
        "import json, os, pathlib\n"
        f"p = pathlib.Path({str(calls)!r}); n = len(p.read_text()) + 1 if p.exists() else 1; p.write_text('x' * n)\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        f"                  'status': {{'token': os.environ['PREFIX'] + str(n), 'expirationTimestamp': {expiry!r}}}}}))\n"
    )
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": ["-c", script], "env": [{"name": "PREFIX", "value": "gen-"}]}}


def authorizations(k8s: Any, kube: Kube, times: int = 1) -> list[str | None]:
    """The Authorization headers the emulator got for `times` listings of pods through `kube`."""
    before = len(list(k8s["get /api/v1/namespaces/ml/pods"]))
    for _ in range(times):
        assert kube.request("GET", "/api/v1/namespaces/ml/pods")["items"] == []
    return [r.headers.get("Authorization") for r in list(k8s["get /api/v1/namespaces/ml/pods"])[before:]]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"token": "t0k3n"}, "Bearer t0k3n"),
        ({"tokenFile": "token.txt"}, "Bearer from-file"),  # relative to the kubeconfig's directory
        ({"username": "admin", "password": "pw"}, "Basic " + b64("admin:pw")),
        ("exec", "Bearer gen-1"),
        ({}, None),
    ],
)
def test_kube_authenticates_as_the_kubeconfig_says(emulator: tuple[Any, Kube], tmp_path: Path,
                                                   user: Any, expected: str | None) -> None:
    k8s, kube = emulator
    (tmp_path / "token.txt").write_text("from-file")
    user = exec_plugin(tmp_path) if user == "exec" else user
    client = Kube.from_kubeconfig(str(write_kubeconfig(tmp_path / "config", kube.server, user)))
    assert client.server == kube.server
    assert authorizations(k8s, client, times=2) == [expected, expected]  # an exec plugin runs once until expiry


def test_kube_refreshes_an_expired_exec_credential(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    user = exec_plugin(tmp_path, expiry="2000-01-01T00:00:00Z")
    client = Kube.from_kubeconfig(str(write_kubeconfig(tmp_path / "config", kube.server, user)))
    first, second = authorizations(k8s, client, times=2)
    assert first and second and first.startswith("Bearer gen-") and second.startswith("Bearer gen-")
    assert first != second  # the plugin ran again for the second request


def test_kube_picks_the_kubeconfig_file_and_context(emulator: tuple[Any, Kube], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    k8s, kube = emulator
    config = write_kubeconfig(tmp_path / "config", kube.server, {"token": "dev"}, other_user={"token": "other"})
    # $KUBECONFIG-style lists skip missing files; --context picks a context other than the current one.
    assert authorizations(k8s, Kube.from_kubeconfig(f"{tmp_path / 'absent'}:{config}", "other")) == ["Bearer other"]
    # Without a path: $KUBECONFIG as it is now (the library reads it once, at import).
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert authorizations(k8s, Kube.from_kubeconfig()) == ["Bearer dev"]
    with pytest.raises(kubernetes.config.ConfigException):
        Kube.from_kubeconfig(str(config), context="prod")


def test_kube_uses_the_service_account_in_a_pod_without_kubeconfig(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("not read until a connection is made")
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    kube = Kube.from_kubeconfig()
    assert kube.server == "https://10.96.0.1:443"
    assert kube.api.configuration.auth_settings()["BearerToken"]["value"] == "bearer sa-token"
    assert kube.api.configuration.ssl_ca_cert == str(ca)


def test_kube_raises_connection_error_when_nothing_answers() -> None:
    """An API server that is away is told apart from one that said no (KubeError)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match=r"GET /api/v1/nodes: "):
        Kube.from_url(f"http://127.0.0.1:{port}").get("/api/v1/nodes")
