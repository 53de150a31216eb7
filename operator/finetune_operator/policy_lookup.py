"""The operator's side of FineTunePolicy: which policy a namespace selects, read from the API and cached.

The API server enforces the policies at admission (`finetune_operator.policy`). Two things admission cannot
see are checked here, once per job before its first pod: a namespace label naming a policy that does not
exist (every parameter of the admission binding then passes), and the GPUs of an auto-sized plan. Lookups
are cached for `ttl` seconds (FT_POLICY_CACHE_SECONDS), so a thousand jobs in one namespace cost two GETs,
not two thousand: the hot path stays as fast as without policies.
"""

from __future__ import annotations

import time
from typing import Any

from finetune_operator import kube
from finetune_operator import policy as policy_mod
from finetune_operator.spec import API_VERSION

TTL = 10.0


class PolicyLookup:
    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._namespaces: dict[str, tuple[float, dict[str, str]]] = {}
        self._policies: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def _namespace_labels(self, api: kube.Kube, namespace: str) -> dict[str, str]:
        hit = self._namespaces.get(namespace)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        obj = await api.get(f"/api/v1/namespaces/{namespace}") or {}
        labels = dict((obj.get("metadata") or {}).get("labels") or {})
        self._namespaces[namespace] = (time.monotonic() + self.ttl, labels)
        return labels

    async def _policy(self, api: kube.Kube, name: str) -> dict[str, Any] | None:
        hit = self._policies.get(name)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        obj = await api.get(f"/apis/{API_VERSION}/{policy_mod.PLURAL}/{name}")
        self._policies[name] = (time.monotonic() + self.ttl, obj)
        return obj

    async def violation(self, api: kube.Kube, namespace: str, gpus: int | None) -> str | None:
        """Why the namespace's policy refuses a job (of `gpus` planned GPUs, None when not planned yet)."""
        name = policy_mod.policy_name(await self._namespace_labels(api, namespace))
        found = await self._policy(api, name)
        if found is None:
            return policy_mod.missing_policy(name, namespace)
        return policy_mod.over_gpu_cap(found, gpus) if gpus is not None else None
