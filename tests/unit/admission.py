"""What the API server would say about a FineTuneJob, without an API server.

The CRD's openAPIV3Schema is checked with jsonschema's Draft 4 validator (OpenAPI 3.0 schemas use Draft 4's
boolean exclusiveMinimum/Maximum; `x-kubernetes-*` keywords are ignored, unknown fields would be pruned),
then every `x-kubernetes-validations` CEL rule is evaluated with cel-python at each node where the object
has a value, binding `self` (and `oldSelf` on updates) as the API server does. Test-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import celpy
import jsonschema

from finetune_operator import crd


@dataclass
class Verdict:
    schema_errors: list[str] = field(default_factory=list)
    cel_errors: list[str] = field(default_factory=list)

    @property
    def admitted(self) -> bool:
        return not self.schema_errors and not self.cel_errors


def _schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _run(rule: str, activation: dict[str, Any]) -> bool:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return bool(_PROGRAMS[rule].evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


def _cel(node: dict[str, Any], value: Any, old: Any, path: str, out: list[str]) -> None:
    for rule in node.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        activation = {"self": value} | ({"oldSelf": old} if transition else {})
        try:
            ok = _run(rule["rule"], activation)
        except celpy.CELEvalError as err:  # the API server reports evaluation errors as failures too
            ok, rule = False, rule | {"message": f"{rule['message']} ({err})"}
        if not ok:
            out.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name in value:
                old_child = old.get(name) if isinstance(old, dict) else None
                _cel(child, value[name], old_child, f"{path}.{name}" if path else name, out)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                _cel(extra, item, None, f"{path}.{key}", out)
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            _cel(node["items"], item, None, f"{path}[{i}]", out)


def admit(obj: Any, old: Any = None) -> Verdict:
    """Validate a create (old None) or an update of `old` to `obj`."""
    schema = _schema()
    verdict = Verdict()
    validator = jsonschema.Draft4Validator(schema)
    if isinstance(obj, dict):
        # Before any schema: the API server decodes the body for the endpoint's group, version and kind
        # (a mismatch is a 400 or 422 there; tests/e2e/test_api_server.py compares each case).
        crd_spec = crd.build_crd()["spec"]
        expected = f"{crd_spec['group']}/{crd_spec['versions'][0]['name']}"
        if obj.get("apiVersion") != expected:
            verdict.schema_errors.append(f"apiVersion: {obj.get('apiVersion')!r} does not match {expected}")
        if obj.get("kind") != crd_spec["names"]["kind"]:
            verdict.schema_errors.append(f"kind: {obj.get('kind')!r} must be {crd_spec['names']['kind']}")
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path)
        verdict.schema_errors.append(f"{where or '<root>'}: {err.message[:200]}")
    if not verdict.schema_errors:
        _cel(schema, obj, old, "", verdict.cel_errors)
    return verdict
