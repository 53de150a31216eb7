"""URIs a FineTuneJob may name, checked before anything is created.

Schemes: `hf://org/name`, `s3://bucket/key`, `pvc://claim/path`, `file:///abs/path`. Every URI is held to a
conservative character set (no whitespace, quotes or shell metacharacters) and may not contain `..`
segments, so no spec value can traverse out of a mount or be interpreted by a shell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAFE_CHARS = re.compile(r"^[A-Za-z0-9._~/+=@,:%-]+$")
_SCHEME = re.compile(r"^([a-z0-9]+)://(.*)$", re.DOTALL)  # DOTALL: a newline must reach the character check
_HF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)\s*([bBmM])(?![A-Za-z0-9])")

SCHEMES = {
    "hf": "hf://org/name",
    "s3": "s3://bucket/prefix/",
    "pvc": "pvc://claim/path",
    "file": "file:///absolute/path",
}


@dataclass(frozen=True)
class Uri:
    scheme: str
    #: hf: org/name; s3: bucket; pvc: claim name; file: empty
    authority: str
    #: s3: key prefix (no leading slash); pvc: path inside the claim; file: absolute path; hf: empty
    path: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "hf":
            return f"hf://{self.authority}"
        return f"{self.scheme}://{self.authority}/{self.path}" if self.path else f"{self.scheme}://{self.authority}"


def parse(uri: str, allowed: tuple[str, ...] = tuple(SCHEMES)) -> Uri:
    """Parse and check a URI, raising ValueError with what is allowed."""
    expected = ", ".join(SCHEMES[s] for s in allowed)
    match = _SCHEME.match(uri)
    if not match or match.group(1) not in allowed:
        raise ValueError(f"unsupported URI {uri!r}; expected one of: {expected}")
    scheme, rest = match.groups()
    if not SAFE_CHARS.fullmatch(rest):
        bad = sorted({c for c in rest if not SAFE_CHARS.fullmatch(c)})
        raise ValueError(
            f"URI {uri!r} contains characters that are not allowed ({''.join(bad)!r}); "
            "use letters, digits and . _ ~ / + = @ , : % -"
        )
    segments = rest.split("/")
    if any(seg in ("..", ".") for seg in segments):
        raise ValueError(f"URI {uri!r} contains a '.' or '..' path segment; path traversal is not allowed")
    if scheme == "hf":
        if not _HF.match(rest.rstrip("/")):
            raise ValueError(f"hf URI {uri!r} must be hf://org/name")
        return Uri("hf", rest.rstrip("/"), "")
    if scheme == "file":
        if not rest.startswith("/") or "//" in rest:
            raise ValueError(f"file URI {uri!r} must be an absolute path: file:///absolute/path")
        return Uri("file", "", rest)
    authority, _, path = rest.partition("/")
    if "//" in path:
        raise ValueError(f"URI {uri!r} has an empty path segment ('//')")
    if scheme == "s3" and not _BUCKET.match(authority):
        raise ValueError(
            f"S3 URI {uri!r} has an invalid bucket name {authority!r}; use 3-63 lowercase letters, digits, '.' or '-'"
        )
    if scheme == "pvc" and not _CLAIM.match(authority):
        raise ValueError(f"PVC URI {uri!r} has an invalid claim name {authority!r}; use a DNS-1123 label")
    return Uri(scheme, authority, path)


def validate(uri: str, allowed: tuple[str, ...]) -> None:
    parse(uri, allowed)


def parameters_from_name(uri: str) -> float | None:
    """The parameter count in billions read from a model name (`Llama-2-7b-hf` -> 7.0), or None.

    Only the last path segment counts (`hf://org/Mistral-7B-v0.1`, `s3://b/models/llama-13b/`). A name
    with several sizes (`8x7B`) or none gives None, and the spec must then set `parameters`.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    found = _SIZE_IN_NAME.findall(name)
    if len(found) != 1:
        return None
    number, unit = found[0]
    value = float(number)
    return value / 1000.0 if unit in "mM" else value
