"""A thin client of the `kubernetes` package's generic ApiClient for the API-server tests (tests/e2e).

The Kubernetes API as JSON dicts: `Kube.request(method, path, body)` turns a path and a dict into a
request and a non-2xx answer into `KubeError`. The library does the rest: it reads the kubeconfig
($KUBECONFIG lists, contexts, inline or file certificates, tokens and token files, basic auth, exec
plugins and their refresh, tls-server-name, proxy-url) or, in a pod without one, the pod's service
account, and does TLS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

#: Seconds one request may take, connecting included.
REQUEST_TIMEOUT = 60


class KubeError(Exception):
    """A non-2xx answer of the API server (status 0: a request the client could not make, such as TLS)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Kube:
    """The Kubernetes API as JSON dicts: `request(method, path, body)`, raising KubeError on non-2xx.

    A request that gets no answer (connection refused or reset, timeout) raises ConnectionError, an OSError,
    so a caller can tell an API server that is away from one that said no.
    """

    def __init__(self, api: kubernetes.client.ApiClient):
        self.api = api
        self.api.user_agent = "finetune-tests"

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self.api.configuration.host)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> Kube:
        """A client for a kubeconfig context (default: the current one). `path` may list several files
        (`a:b`, as $KUBECONFIG does); without it, $KUBECONFIG or ~/.kube/config, and in a pod that has
        neither, the pod's service account."""
        default = os.environ.get("KUBECONFIG") or "~/.kube/config"
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if path is None and context is None and in_pod and not os.environ.get("KUBECONFIG") \
                and not Path(default).expanduser().exists():
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return cls(kubernetes.client.ApiClient(configuration))
        # The default is passed explicitly: the library reads $KUBECONFIG once, when it is imported. Nothing
        # is written back to the kubeconfig (persist_config=False), not even a refreshed credential.
        return cls(kubernetes.config.new_client_from_config(
            config_file=path or default, context=context, persist_config=False))

    @classmethod
    def from_url(cls, url: str) -> Kube:
        """A client without credentials (a plain-HTTP emulator in tests, or `kubectl proxy`)."""
        return cls(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url.rstrip("/"))))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            # auth_settings: the kubeconfig's credential (token, token file, basic auth, exec plugin, refreshed
            # when it expires); client certificates and the CA are in the ApiClient's connection pool.
            prepared = self.api.param_serialize(method, path, query_params=dict(query) if query else None,
                                                header_params=headers, body=body, auth_settings=["BearerToken"])
            response = self.api.call_api(*prepared, _request_timeout=REQUEST_TIMEOUT)
            text = response.read().decode("utf-8", errors="replace")
        except kubernetes.client.ApiException as err:
            raise KubeError(err.status or 0, f"{method} {path}: {err.reason}") from err
        except urllib3.exceptions.HTTPError as err:
            raise ConnectionError(f"{method} {path}: {err}") from err
        if not 200 <= response.status <= 299:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(response.status, f"{method} {path}: {message}")
        return json.loads(text) if text else {}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def patch(self, path: str, body: Mapping[str, Any], strategic: bool = True) -> dict[str, Any]:
        kind = "application/strategic-merge-patch+json" if strategic else "application/merge-patch+json"
        return self.request("PATCH", path, body=dict(body), content_type=kind)
