"""The operator's side of FineTunePolicy: which policy a namespace selects, read from the API and cached.

The API server enforces the policies at admission (`finetune_operator.policy`). Two things admission cannot
see are checked here, once per job before its first pod: a namespace label naming a policy that does not
exist (every parameter of the admission binding then passes), and the GPUs of an auto-sized plan. Lookups
are cached for `ttl` seconds (FT_POLICY_CACHE_SECONDS), so a thousand jobs in one namespace cost two GETs,
not two thousand: the hot path stays as fast as without policies.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from finetune_operator import kube
from finetune_operator import policy as policy_mod
from finetune_operator.spec import API_VERSION

TTL = 10.0
_T = TypeVar("_T")


class PolicyLookup:
    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._namespaces: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._policies: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def _cached(self, store: dict[str, tuple[float, _T]], key: str, fetch: Callable[[], Awaitable[_T]]) -> _T:
        hit = store.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        value = await fetch()
        store[key] = (time.monotonic() + self.ttl, value)
        return value

    async def violation(self, api: kube.Kube, namespace: str, gpus: int | None) -> str | None:
        """Why the namespace's policy refuses a job (of `gpus` planned GPUs, None when not planned yet)."""
        ns = await self._cached(self._namespaces, namespace, lambda: api.get(f"/api/v1/namespaces/{namespace}"))
        name = policy_mod.policy_name(((ns or {}).get("metadata") or {}).get("labels"))
        found = await self._cached(self._policies, name,
                                   lambda: api.get(f"/apis/{API_VERSION}/{policy_mod.PLURAL}/{name}"))
        if found is None:
            return policy_mod.missing_policy(name, namespace)
        return policy_mod.over_gpu_cap(found, gpus) if gpus is not None else None
