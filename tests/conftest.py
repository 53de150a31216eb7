"""Shared pytest options and the real Kubernetes control plane of the tests that need an API server.

Tests marked `e2e` (tests/e2e) run against a real API server, from one of two sources:
- `KUBECONFIG=... pytest --e2e`: the cluster of that kubeconfig (kind, k3s, a cloud cluster);
- otherwise `KUBEBUILDER_ASSETS` naming a folder with etcd, kube-apiserver and kube-controller-manager:
  a fresh control plane on loopback for the session (tests/envtest.py), as controller-runtime's envtest.
`.ci/run` sets KUBEBUILDER_ASSETS to ../shared/envtest where that folder exists, so CI runs them all.
Without either they are skipped, with a message that says how to get a control plane.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests import envtest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--e2e", action="store_true", default=False,
                     help="run tests/e2e against $KUBECONFIG's cluster instead of a KUBEBUILDER_ASSETS control plane")


def _given_cluster(config: pytest.Config) -> str | None:
    """The kubeconfig of a cluster the user named (`--e2e` with KUBECONFIG), if any."""
    path = os.environ.get("KUBECONFIG")
    return path if config.getoption("--e2e") and path else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        assets = envtest.assets_dir()
    except RuntimeError as err:  # KUBEBUILDER_ASSETS set but incomplete: say so, do not skip silently
        raise pytest.UsageError(str(err)) from None
    if _given_cluster(config) or assets is not None:
        return
    skip = pytest.mark.skip(reason=f"e2e: {envtest.HOW_TO_GET_ONE}")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Path of an admin kubeconfig for a real API server: the user's cluster, or a fresh control plane.

    The control plane's processes stop at the end of the session, also when a test fails or the run is
    interrupted (tests/envtest.py); its logs stay in pytest's temporary directory."""
    given = _given_cluster(request.config)
    if given:
        yield given
        return
    assets = envtest.assets_dir()
    if assets is None:
        pytest.skip(envtest.HOW_TO_GET_ONE)
    with envtest.ControlPlane(assets, tmp_path_factory.mktemp("envtest")) as plane:
        sys.stderr.write(f"\n[envtest] control plane from {assets} ready in {plane.started_seconds:.1f}s "
                         f"at {plane.server} (logs: {plane.dir})\n")
        yield str(plane.kubeconfig_path)
