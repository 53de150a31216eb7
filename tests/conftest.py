"""Shared pytest options: e2e tests run only with --e2e and a KUBECONFIG."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--e2e", action="store_true", default=False, help="run tests/e2e against $KUBECONFIG's cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_e2e = config.getoption("--e2e") and bool(os.environ.get("KUBECONFIG"))
    skip = pytest.mark.skip(reason="e2e: needs a cluster; run with KUBECONFIG=... pytest --e2e tests/e2e")
    for item in items:
        if "e2e" in item.keywords and not run_e2e:
            item.add_marker(skip)
