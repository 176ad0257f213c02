"""OCI image references, validated against the distribution grammar, and the one safe
way to put a job-derived string into a runtime API's URL path.

    reference  := name [":" tag] ["@" digest]
    name       := [domain "/"] path                  (at most 255 characters)
    domain     := host [":" port]                     host: DNS name, IPv4, or [IPv6]
    path       := component ("/" component)*          component: [a-z0-9]+ joined by
                                                      ".", "_", "__" or "-"s
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := sha256:<64 hex> | sha384:<96 hex> | sha512:<128 hex>  (lower-case hex)

As `docker pull` reads a name, its first component is the domain only when it has a
"." or ":", is "localhost", or has upper-case letters (a path never has any).

An image name reaches runtime APIs as a URL path segment (`/images/<name>/json`):
unchecked, `x/../../events?` becomes a request for the runtime's endless event stream.
So workers accept only references this grammar allows (a driver checks again before it
calls its runtime), and encode every job-derived segment (`url_path_segment`) all the
same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

NAME_MAX_LENGTH = 255  # the distribution spec's limit for domain/path
REFERENCE_MAX_LENGTH = 512  # name, tag (≤ 128) and the longest digest (sha512) fit

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]+")
_PATH_RULE = "lower-case letters and digits, separated by '.', '_', '__' or '-'"


@dataclass(frozen=True)
class ImageReference:
    """A valid reference; `str()` gives back the text it was parsed from."""

    domain: str | None  # registry host[:port]; None: the runtime's default registry
    path: str  # repository path, e.g. "library/busybox"
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        return self.path if self.domain is None else f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        tag = "" if self.tag is None else f":{self.tag}"
        digest = "" if self.digest is None else f"@{self.digest}"
        return f"{self.name}{tag}{digest}"


def parse_image_reference(text: str) -> ImageReference:
    """`text` as an ImageReference; ValueError saying which rule it breaks."""
    if not text:
        raise ValueError("an image reference cannot be empty")
    if len(text) > REFERENCE_MAX_LENGTH:
        raise ValueError(f"an image reference has at most {REFERENCE_MAX_LENGTH} characters")
    remainder, _, digest = text.partition("@")
    name, tag = _split_tag(remainder)
    if len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"an image name has at most {NAME_MAX_LENGTH} characters")
    domain, path = _split_domain(name)
    if domain is not None:
        _check_domain(domain)
    _check_path(path)
    if tag is not None:
        _check_tag(tag)
    if "@" in text:
        _check_digest(digest)
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest or None)


def url_path_segment(text: str) -> str:
    """`text` as one URL path segment, every reserved character percent-encoded.

    For image references, container names and ids. Refused: a value with an empty,
    "." or ".." part between its slashes. Encoding cannot make those safe: URL
    libraries (yarl) decode "%2E", and runtimes' routers (Go's gorilla/mux) decode
    "%2F" before they resolve dot segments, and redirect to the path that results.
    """
    if {"", ".", ".."} & set(text.split("/")):
        raise ValueError(f"{text!r} cannot be a URL path segment: it has an empty or dot part")
    return quote(text, safe="")


def _split_tag(remainder: str) -> tuple[str, str | None]:
    """name[:tag]: a ":" after the last "/" starts the tag (one before it is a port's)."""
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        return remainder[:colon], remainder[colon + 1 :]
    return remainder, None


def _split_domain(name: str) -> tuple[str | None, str]:
    first, slash, rest = name.partition("/")
    is_domain = any(c in first for c in ".:") or first == "localhost" or first != first.lower()
    if slash and is_domain:
        return first, rest
    return None, name


def _check_domain(domain: str) -> None:
    if _DOMAIN.fullmatch(domain) is None:
        raise ValueError(
            f"registry {domain!r} is not a host[:port] (DNS name, IPv4 or [IPv6], port digits)"
        )


def _check_path(path: str) -> None:
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component) is None:
            raise ValueError(f"repository path component {component!r} must be {_PATH_RULE}")


def _check_tag(tag: str) -> None:
    if _TAG.fullmatch(tag) is None:
        raise ValueError(
            f"tag {tag!r} must be 1 to 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )


def _check_digest(digest: str) -> None:
    algorithm, _, hex_part = digest.partition(":")
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        known = ", ".join(_DIGEST_HEX_LENGTH)
        raise ValueError(f"digest {digest!r} must be <algorithm>:<hex>, algorithm one of {known}")
    if len(hex_part) != length or _LOWER_HEX.fullmatch(hex_part) is None:
        raise ValueError(f"a {algorithm} digest has {length} lower-case hex digits")
