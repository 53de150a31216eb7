"""`finetune_operator.kube` against a tiny scripted API server (aiohttp on 127.0.0.1): what each answer
becomes (a dict, None, `NotFound`, `Conflict`, `ApiError`, `Unreachable`), which answers are retried and
after how long (kopf's `networking.error_backoffs`, a longer `Retry-After` on 429/503), what is sent
(merge patches, the label selector, the bearer token), a second login after a 401, and TLS with client
certificates given inline, as a kubeconfig's `*-data` fields carry them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp.web
import kopf
import pytest

from finetune_operator import kube


def status_body(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message, **({"details": details} if details else {})}


class Script:
    """Answers in order (the last one repeats), and every request as received."""

    def __init__(self, *answers: tuple[int, Any] | tuple[int, Any, dict[str, str]]):
        self.answers = list(answers)
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        raw = await request.read()
        self.seen.append({
            "method": request.method, "path": request.path, "query": dict(request.query),
            "headers": dict(request.headers), "body": json.loads(raw) if raw else None, "at": time.monotonic(),
        })
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        status, body = answer[0], answer[1]
        headers = answer[2] if len(answer) > 2 else {}
        return aiohttp.web.json_response(body, status=status, headers=headers)

    def pauses(self) -> list[float]:
        return [b["at"] - a["at"] for a, b in zip(self.seen, self.seen[1:], strict=False)]


@asynccontextmanager
async def served(handler: Callable[[aiohttp.web.Request], Any], ssl_context: ssl.SSLContext | None = None
                 ) -> AsyncIterator[str]:
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def settings(backoffs: Any = (0.01, 0.02, 0.03)) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.networking.error_backoffs = backoffs
    s.networking.request_timeout = 5
    s.networking.connect_timeout = 2
    return s


async def client(server: str, *, token: str = "t0k3n", backoffs: Any = (0.01, 0.02, 0.03),
                 relogin: kube.Relogin | None = None) -> kube.Kube:
    identity = kube.Identity()
    identity.update(kopf.ConnectionInfo(server=server, token=token), relogin=relogin)
    return kube.Kube(settings(backoffs), identity)


def run(script: Script, call: Callable[[kube.Kube], Any], **kwargs: Any) -> Any:
    async def main() -> Any:
        async with served(script.handle) as server:
            api = await client(server, **kwargs)
            try:
                return await call(api)
            finally:
                await api.close()

    return asyncio.run(main())


# --- answers ---------------------------------------------------------------------------------------


def test_a_read_is_a_plain_dict_with_the_bearer_token_sent() -> None:
    script = Script((200, {"kind": "ConfigMap", "metadata": {"name": "a"}}))
    got = run(script, lambda api: api.get("/api/v1/namespaces/ns/configmaps/a"))
    assert got == {"kind": "ConfigMap", "metadata": {"name": "a"}} and type(got) is dict
    (seen,) = script.seen
    assert seen["method"] == "GET" and seen["path"] == "/api/v1/namespaces/ns/configmaps/a"
    assert seen["headers"]["Authorization"] == "Bearer t0k3n"
    assert seen["headers"]["User-Agent"].startswith("finetune-operator")


def test_missing_object_reads_as_none_but_patching_it_raises_not_found() -> None:
    script = Script((404, status_body(404, "NotFound", 'configmaps "a" not found')))
    assert run(script, lambda api: api.get("/api/v1/namespaces/ns/configmaps/a")) is None

    async def patch(api: kube.Kube) -> Any:
        with pytest.raises(kube.NotFound) as caught:
            await api.patch("/api/v1/namespaces/ns/configmaps/a", {"data": {}})
        return caught.value

    err = run(Script((404, status_body(404, "NotFound", 'configmaps "a" not found'))), patch)
    assert err.status == 404 and err.reason == "NotFound" and 'configmaps "a" not found' in str(err)


def test_create_conflict_is_raised_once_never_retried() -> None:
    script = Script((409, status_body(409, "AlreadyExists", 'jobs.batch "demo" already exists')))

    async def create(api: kube.Kube) -> Any:
        with pytest.raises(kube.Conflict) as caught:
            await api.create("/apis/batch/v1/namespaces/ns/jobs", {"metadata": {"name": "demo"}})
        return caught.value

    err = run(script, create)
    assert isinstance(err, kube.ApiError) and err.status == 409 and err.reason == "AlreadyExists"
    assert len(script.seen) == 1
    assert script.seen[0]["method"] == "POST" and script.seen[0]["body"] == {"metadata": {"name": "demo"}}


def test_other_refusals_are_not_retried() -> None:
    for status in (400, 403, 422):
        script = Script((status, status_body(status, "Refused", "no")))

        async def patch(api: kube.Kube) -> Any:
            with pytest.raises(kube.ApiError) as caught:
                await api.patch("/api/v1/namespaces/ns/services/s", {"spec": {}})
            return caught.value

        err = run(script, patch)
        assert type(err) is kube.ApiError and err.status == status
        assert len(script.seen) == 1, status


def test_patches_are_merge_patches_and_lists_select_by_label() -> None:
    script = Script((200, {"metadata": {"name": "j"}}), (200, {"items": [{"metadata": {"name": "p"}}]}))

    async def calls(api: kube.Kube) -> Any:
        await api.patch("/apis/batch/v1/namespaces/ns/jobs/j", {"spec": {"suspend": True}, "x": None})
        return await api.list("/api/v1/namespaces/ns/pods", label_selector="a=b,c")

    assert run(script, calls) == [{"metadata": {"name": "p"}}]
    patch, listing = script.seen
    assert patch["headers"]["Content-Type"] == "application/merge-patch+json"
    assert patch["body"] == {"spec": {"suspend": True}, "x": None}
    assert listing["query"] == {"labelSelector": "a=b,c"}


# --- retries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_answers_are_retried_on_the_backoff_schedule(status: int) -> None:
    script = Script((status, status_body(status, "Busy", "later")), (status, status_body(status, "Busy", "later")),
                    (201, {"metadata": {"name": "e"}}))
    got = run(script, lambda api: api.create("/api/v1/namespaces/ns/events", {"metadata": {"name": "e"}}),
              backoffs=(0.2, 0.4, 5))
    assert got == {"metadata": {"name": "e"}}
    assert len(script.seen) == 3
    first, second = script.pauses()
    assert 0.2 <= first < 0.4 + 0.5 and 0.4 <= second < 0.4 + 0.5, script.pauses()


def test_retries_end_with_the_last_answer_after_every_backoff() -> None:
    script = Script((500, status_body(500, "InternalError", "etcd is down")))

    async def get(api: kube.Kube) -> Any:
        with pytest.raises(kube.ApiError) as caught:
            await api.get("/api/v1/namespaces/ns/configmaps/a")
        return caught.value

    err = run(script, get, backoffs=(0.01, 0.01, 0.01))
    assert err.status == 500 and "etcd is down" in str(err)
    assert len(script.seen) == 4  # one attempt, then one per backoff


def test_a_single_number_backoff_means_one_retry() -> None:
    script = Script((503, status_body(503, "ServiceUnavailable", "")))

    async def get(api: kube.Kube) -> Any:
        with pytest.raises(kube.ApiError):
            await api.get("/api/v1/namespaces/ns/configmaps/a")

    run(script, get, backoffs=0.01)
    assert len(script.seen) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_a_longer_retry_after_is_honoured(status: int) -> None:
    script = Script((status, status_body(status, "TooManyRequests", "slow down"), {"Retry-After": "1"}),
                    (200, {"ok": True}))
    assert run(script, lambda api: api.get("/x"), backoffs=(0.05, 0.05)) == {"ok": True}
    (pause,) = script.pauses()
    assert 1.0 <= pause < 2.0, pause


def test_retry_after_from_the_status_details_and_a_shorter_one_ignored() -> None:
    script = Script((429, status_body(429, "TooManyRequests", "", retryAfterSeconds=1)), (200, {"ok": 1}))
    assert run(script, lambda api: api.get("/x"), backoffs=(0.05,)) == {"ok": 1}
    assert 1.0 <= script.pauses()[0] < 2.0
    # The server asks for less than the client's own backoff: the backoff wins.
    script = Script((429, status_body(429, "TooManyRequests", ""), {"Retry-After": "0"}), (200, {"ok": 2}))
    assert run(script, lambda api: api.get("/x"), backoffs=(0.5,)) == {"ok": 2}
    assert 0.5 <= script.pauses()[0] < 1.0


def test_retry_after_on_a_500_is_not_a_reason_to_wait() -> None:
    script = Script((500, status_body(500, "InternalError", ""), {"Retry-After": "30"}), (200, {"ok": 1}))
    assert run(script, lambda api: api.get("/x"), backoffs=(0.05,)) == {"ok": 1}
    assert script.pauses()[0] < 1.0


def test_no_server_is_unreachable_after_the_retries() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> Any:
        api = await client(f"http://127.0.0.1:{port}", backoffs=(0.01, 0.01))
        try:
            with pytest.raises(kube.Unreachable) as caught:
                await api.get("/api/v1/namespaces/ns/configmaps/a")
            return caught.value
        finally:
            await api.close()

    started = time.monotonic()
    err = asyncio.run(main())
    assert err.status == 0 and isinstance(err, kube.ApiError)
    assert time.monotonic() - started < 5


# --- identity --------------------------------------------------------------------------------------


def test_a_401_logs_in_again_and_repeats_the_request_once() -> None:
    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") == "Bearer fresh":
            return aiohttp.web.json_response({"ok": True})
        return aiohttp.web.json_response(status_body(401, "Unauthorized", ""), status=401)

    seen: list[str] = []
    logins: list[str] = []

    async def main(fresh: str) -> Any:
        async with served(handler) as server:
            async def relogin() -> kopf.ConnectionInfo:
                logins.append(fresh)
                return kopf.ConnectionInfo(server=server, token=fresh)

            api = await client(server, token="stale", relogin=relogin)
            try:
                return await api.get("/x")
            finally:
                await api.close()

    assert asyncio.run(main("fresh")) == {"ok": True}
    assert seen == ["Bearer stale", "Bearer fresh"] and logins == ["fresh"]

    seen.clear()
    logins.clear()
    with pytest.raises(kube.Unauthorized):  # the login gives the same refused token: no second try
        asyncio.run(main("stale"))
    assert seen == ["Bearer stale"] and logins == ["stale"]


def test_a_request_waits_for_the_first_login() -> None:
    script = Script((200, {"ok": True}))

    async def main() -> Any:
        async with served(script.handle) as server:
            identity = kube.Identity()
            api = kube.Kube(settings(), identity)
            asyncio.get_running_loop().call_later(0.2, identity.update, kopf.ConnectionInfo(server=server))
            try:
                return await api.get("/x")
            finally:
                await api.close()

    assert asyncio.run(main()) == {"ok": True}
    assert "Authorization" not in script.seen[0]["headers"]


def test_credentials_become_the_headers_kopf_would_send() -> None:
    assert kube.headers(kopf.ConnectionInfo(server="https://h", token="abc"))["Authorization"] == "Bearer abc"
    assert kube.headers(kopf.ConnectionInfo(server="https://h", token="abc", scheme="Token"))["Authorization"] \
        == "Token abc"
    basic = kube.headers(kopf.ConnectionInfo(server="https://h", username="u", password="p"))
    assert basic["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert "Authorization" not in kube.headers(kopf.ConnectionInfo(server="https://h"))
    assert kube.headers(kopf.ConnectionInfo(server="https://h"))["User-Agent"].startswith("finetune-operator ")


def test_insecure_skips_verification_and_a_ca_verifies() -> None:
    insecure = kube.tls(kopf.ConnectionInfo(server="https://h", insecure=True), lambda: "unused")
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    secure = kube.tls(kopf.ConnectionInfo(server="https://h"), lambda: "unused")
    assert secure.verify_mode == ssl.CERT_REQUIRED and secure.check_hostname


def test_files_only_when_there_is_inline_client_certificate(tmp_path: Path) -> None:
    """An in-cluster login (CA and token from files) writes nothing: the pod's root is read-only. An
    inline CA goes to OpenSSL from memory; only an inline client certificate needs a file."""
    envtest = pytest.importorskip("tests.envtest")  # cryptography: the test extra
    pki = envtest.Pki(tmp_path / "pki")

    def no_scratch() -> str:
        raise AssertionError("no folder needed")

    info = kopf.ConnectionInfo(server="https://kubernetes.default.svc", ca_path=str(pki.ca), token="sa")
    assert kube.tls(info, no_scratch).get_ca_certs()
    inline_ca = kopf.ConnectionInfo(server="https://h", ca_data=base64.b64encode(pki.ca.read_bytes()).decode())
    assert kube.tls(inline_ca, no_scratch).get_ca_certs()
    cert, key = pki.admin
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    inline = kopf.ConnectionInfo(server="https://h", certificate_data=cert.read_text(),
                                 private_key_data=base64.b64encode(key.read_bytes()).decode())
    kube.tls(inline, lambda: str(scratch))
    assert sorted(p.name for p in scratch.iterdir()) == ["client.crt", "client.key"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in scratch.iterdir())
    assert (scratch / "client.key").read_bytes() == key.read_bytes()


def test_tls_with_client_certificates_from_kubeconfig_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity of a kubeconfig with embedded CA, client certificate and key, over verified TLS."""
    envtest = pytest.importorskip("tests.envtest")  # cryptography: the test extra
    pki = envtest.Pki(tmp_path / "pki")
    cert, key = pki.admin
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_ctx.load_cert_chain(*pki.serving)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(item[0] for item in (peer or {}).get("subject", ()))
        return aiohttp.web.json_response({"user": subject.get("commonName")})

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    async def main() -> Any:
        async with served(handler, server_ctx) as server:
            config = {
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": b64(pki.ca)}}],
                "users": [{"name": "u", "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
            path = tmp_path / "kubeconfig"
            path.write_text(json.dumps(config))
            monkeypatch.setenv("KUBECONFIG", str(path))
            info = kopf.login_with_kubeconfig(settings=settings())
            assert info is not None and info.certificate_data
            identity = kube.Identity()
            identity.update(info)
            api = kube.Kube(settings(), identity)
            try:
                answer = await api.get("/version")
                # The inline key went to a private folder, gone again once OpenSSL holds it.
                assert list(scratch.iterdir()) == []
                return answer
            finally:
                await api.close()

    assert asyncio.run(main()) == {"user": "finetune-envtest-admin"}
    assert list(scratch.iterdir()) == []
