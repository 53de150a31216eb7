"""The test control plane itself (tests/envtest.py): a port taken between `free_port` picking it and the
process binding it makes the start try again on other ports (seen once in CI: kube-apiserver's
"address already in use", which failed every test of the tier)."""

from __future__ import annotations

import socket

import pytest

from tests import envtest

pytestmark = pytest.mark.e2e


def test_a_taken_port_is_tried_again(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assets = envtest.assets_dir()
    if assets is None:
        pytest.skip(envtest.HOW_TO_GET_ONE)
    with socket.socket() as blocker:
        blocker.bind((envtest.HOST, 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        real = envtest.free_port
        # etcd client, etcd peer, kube-apiserver (the taken one), controller manager; then fresh ports.
        picks = iter([real(), real(), taken, real()])
        monkeypatch.setattr(envtest, "free_port", lambda: next(picks, None) or real())
        with envtest.ControlPlane(assets) as plane:
            assert plane.server != f"https://{envtest.HOST}:{taken}"
            assert plane._get("/readyz", raw=True) == "ok"
    assert "starting again on other ports" in capsys.readouterr().err
