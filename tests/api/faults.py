"""Scripted API-server faults for the kmock emulator: what a flaky, overloaded or dying control plane does.

The emulator (`tests.api.conftest.Emulator`) asks `Chaos.decide` about every request before serving it.
Requests from the test itself (the synchronous client plays kubectl and the cluster's controllers) carry
the `TEST_HEADER` and are never faulted; everything else is the operator (kopf's client and its own).

Effects of a `Fault`:

- `refuse`: answer with the status (a Kubernetes `Status` body, optional `Retry-After`) and change nothing:
  409 Conflict, 422 Invalid, 429 throttling, 500/503 an API server in trouble;
- `lose-answer`: the request takes effect, then the answer is lost (the client sees the status): a create
  stored by etcd whose response never arrived, so the client's retry meets its own object;
- `delete-first`: the object is deleted (a real DELETE through the emulator, with its watch event) just
  before the request is served, so the request meets a 404: the object went away mid-reconcile;
- `stall`: a watch request gets its headers and then nothing, ever, on a connection that stays open.

`expire_watches` makes the open watch streams of a resource end with `ERROR 410 Gone` in place of their
next event (the event is lost, as when etcd compacted past the client's resourceVersion); the client must
re-list. `kill_after(k)` plays an operator killed at its k-th API request (or k-th write): that request
takes effect but its answer is lost, and every later request of the operator is refused with 503 (nothing
reaches the API server any more, and no client retry can succeed) until `revive()`.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

TEST_HEADER = "X-Kmock-Test-Client"

Effect = Literal["refuse", "lose-answer", "delete-first", "stall"]
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Fault:
    """One scripted failure: which operator requests it hits, how often, and what they get."""

    verb: str  # kmock's action: list, watch, fetch, create, update (PATCH), delete
    plural: str
    status: int = 503
    name: str | None = None  # None: any object
    subresource: str | None = None  # None: the object itself; "status"; "*": either
    times: int = 1
    retry_after: int | None = None
    effect: Effect = "refuse"
    hits: int = 0

    @property
    def reason(self) -> str:
        return _REASONS.get(self.status, "Error")

    def matches(self, call: Call) -> bool:
        return (
            self.hits < self.times
            and call.verb == self.verb
            and call.plural == self.plural
            and (self.name is None or call.name == self.name)
            and (self.subresource == "*" or call.subresource == self.subresource)
        )


@dataclass(frozen=True)
class Call:
    """One request as the emulator saw it."""

    seq: int
    operator: bool  # False: the test's own client
    verb: str
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None
    body: str | None = None
    selector: str | None = None  # the labelSelector of a list or watch

    def __str__(self) -> str:
        sub = f"/{self.subresource}" if self.subresource else ""
        return f"{self.verb} {self.plural}{sub}" + (f" {self.name}" if self.name else "")


@dataclass
class Chaos:
    """The fault plan of one emulator, shared between the test thread and the emulator's loop."""

    keep_bodies: bool = False
    faults: list[Fault] = field(default_factory=list)
    journal: list[Call] = field(default_factory=list)
    killed: threading.Event = field(default_factory=threading.Event)
    kill_call: Call | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _kill_at: int | None = None
    _counted: int = 0
    _kill_writes: bool = False
    _down: bool = False
    _expiring: Counter[str] = field(default_factory=Counter)

    # -- the test's side ---------------------------------------------------------------------------

    def add(self, *faults: Fault) -> list[Fault]:
        with self._lock:
            self.faults.extend(faults)
        return list(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self._expiring.clear()

    def expire_watches(self, plural: str, times: int = 1) -> None:
        with self._lock:
            self._expiring[plural] += times

    def kill_after(self, k: int, *, writes_only: bool = False) -> None:
        """The operator dies at its k-th API request from now on (watches are not counted), or at its
        k-th write (create, patch, delete) when `writes_only`."""
        with self._lock:
            self._kill_at, self._counted, self._down, self.kill_call = k, 0, False, None
            self._kill_writes = writes_only
            self.killed.clear()

    def revive(self) -> None:
        with self._lock:
            self._kill_at, self._down = None, False
            self.killed.clear()

    def calls(self, *, operator: bool = True) -> list[Call]:
        with self._lock:
            return [c for c in self.journal if c.operator == operator]

    # -- the emulator's side -----------------------------------------------------------------------

    def record(self, request: Any) -> Call:
        resource = request.resource
        headers = {k.lower() for k in (request.headers or {})}
        with self._lock:
            call = Call(
                seq=len(self.journal),
                operator=TEST_HEADER.lower() not in headers,
                verb=(request.action or request.method).value.lower(),
                plural=resource.plural if resource is not None else None,
                namespace=request.namespace,
                name=request.name,
                subresource=request.subresource,
                body=request.text if self.keep_bodies and request.text else None,
                selector=(request.params or {}).get("labelSelector"),
            )
            self.journal.append(call)
        return call

    def decide(self, call: Call) -> Fault | None:
        """The fault this request meets, if any (the test's own requests never meet one)."""
        if not call.operator:
            return None
        with self._lock:
            if self._down:
                # 503 at once, nothing stored. (Leaving the dead operator's requests unanswered would be
                # closer to a dead process, but kopf's client then retries on its 30 s timeouts, and a
                # cancellation racing those timeouts can keep KopfRunner from stopping for minutes.)
                return Fault(call.verb, str(call.plural), status=503)
            if self._kill_at is not None and self._counts(call):
                self._counted += 1
                if self._counted >= self._kill_at:
                    self._down = True
                    self.kill_call = call
                    self.killed.set()
                    return Fault(call.verb, str(call.plural), status=503, effect="lose-answer")
            for fault in self.faults:
                if fault.matches(call):
                    fault.hits += 1
                    return fault
        return None

    def _counts(self, call: Call) -> bool:
        if self._kill_writes:
            return call.verb in ("create", "update", "delete")
        return call.verb != "watch"

    def take_expiry(self, plural: str | None) -> bool:
        """Whether the next event of an open `plural` watch is replaced by `410 Gone`."""
        with self._lock:
            if plural is None or self._expiring[plural] <= 0:
                return False
            self._expiring[plural] -= 1
            return True


def status_body(fault: Fault) -> dict[str, Any]:
    """The Kubernetes `Status` an API server answers an error with."""
    details: dict[str, Any] = {"causes": [{"message": "injected by the test"}]}
    if fault.retry_after is not None:
        details["retryAfterSeconds"] = fault.retry_after
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": fault.status,
        "reason": fault.reason,
        "message": f"{fault.reason} (injected by the test)",
        "details": details,
    }


GONE_EVENT: dict[str, Any] = {
    "type": "ERROR",
    "object": {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": "too old resource version (injected by the test)",
    },
}


__all__ = ["GONE_EVENT", "TEST_HEADER", "Call", "Chaos", "Fault", "status_body"]
