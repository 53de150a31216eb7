"""Shared pytest options and the real Kubernetes control plane of the tests that need an API server.

Tests marked `e2e` (tests/e2e) run against a real API server, from one of two sources:
- `KUBECONFIG=... pytest --e2e`: the cluster of that kubeconfig (kind, k3s, a cloud cluster);
- otherwise `KUBEBUILDER_ASSETS` naming a folder with etcd, kube-apiserver and kube-controller-manager:
  a fresh control plane on loopback for the session (tests/envtest.py), as controller-runtime's envtest.
`.ci/run` sets KUBEBUILDER_ASSETS to ../shared/envtest where that folder exists, so CI runs them all.
Without either they are skipped, with a message that says how to get a control plane. The `kubeconfig`
fixture itself lives in tests/e2e/conftest.py, scoped to that package: the control plane stops when the
e2e tests are done, before the CPU-heavy trainer tests run.
"""

from __future__ import annotations

import os

import pytest

from tests import envtest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--e2e", action="store_true", default=False,
                     help="run tests/e2e against $KUBECONFIG's cluster instead of a KUBEBUILDER_ASSETS control plane")


def given_cluster(config: pytest.Config) -> str | None:
    """The kubeconfig of a cluster the user named (`--e2e` with KUBECONFIG), if any."""
    path = os.environ.get("KUBECONFIG")
    return path if config.getoption("--e2e") and path else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        assets = envtest.assets_dir()
    except RuntimeError as err:  # KUBEBUILDER_ASSETS set but incomplete: say so, do not skip silently
        raise pytest.UsageError(str(err)) from None
    if given_cluster(config) or assets is not None:
        return
    skip = pytest.mark.skip(reason=f"e2e: {envtest.HOW_TO_GET_ONE}")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
