"""Image references: the distribution grammar, its reasons, and its properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.image_ref import (
    NAME_MAX_LENGTH,
    REFERENCE_MAX_LENGTH,
    ImageReference,
    parse_image_reference,
    url_path_segment,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ImageReference(None, "busybox")),
        ("sandfleet-test/busybox:latest", ImageReference(None, "sandfleet-test/busybox", "latest")),
        ("127.0.0.1:9/sandfleet/absent:1", ImageReference("127.0.0.1:9", "sandfleet/absent", "1")),
        ("localhost/x", ImageReference("localhost", "x")),
        ("localhost:5000", ImageReference(None, "localhost", "5000")),  # as docker reads it
        ("Registry/x", ImageReference("Registry", "x")),  # upper case: only a domain has it
        ("[::1]:5000/a/b:v1.2", ImageReference("[::1]:5000", "a/b", "v1.2")),
        ("a__b/c-----d/e.f:_X", ImageReference(None, "a__b/c-----d/e.f", "_X")),
        (f"ghcr.io/o/r:t@{DIGEST}", ImageReference("ghcr.io", "o/r", "t", DIGEST)),
        (f"r@{DIGEST}", ImageReference(None, "r", None, DIGEST)),
    ],
)
def test_valid_references_parse_into_their_parts(text: str, expected: ImageReference) -> None:
    assert parse_image_reference(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x/../../events?", "repository path component '..' must be lower-case letters"),
        ("../events", "registry '..' is not a host[:port]"),
        ("a/./b", "repository path component '.'"),
        ("Busybox", "repository path component 'Busybox'"),
        ("docker.io/Library/busybox", "repository path component 'Library'"),
        ("busy box", "repository path component 'busy box'"),
        ("busybox ", "repository path component 'busybox '"),
        ("busybox#x", "repository path component 'busybox#x'"),
        ("a/b?c", "repository path component 'b?c'"),
        ("a%2Fb", "repository path component 'a%2Fb'"),
        ("a//b", "repository path component ''"),
        ("a/", "repository path component ''"),
        ("-a", "repository path component '-a'"),
        ("a_", "repository path component 'a_'"),
        ("a___b", "repository path component 'a___b'"),
        ("busybox:", "tag '' must be 1 to 128"),
        ("busybox:.x", "tag '.x'"),
        ("busybox:" + "t" * 129, "tag 't"),
        ("busybox:a/b", "registry 'busybox:a' is not a host[:port]"),
        ("exa mple.com/x", "registry 'exa mple.com' is not a host[:port]"),
        ("example.com:port/x", "registry 'example.com:port'"),
        ("-example.com/x", "registry '-example.com'"),
        ("busybox@", "digest '' must be <algorithm>:<hex>"),
        ("busybox@md5:" + "a" * 32, "digest 'md5:"),
        ("busybox@sha256:" + "A" * 64, "a sha256 digest has 64 lower-case hex digits"),
        ("busybox@sha256:abc", "a sha256 digest has 64"),
        ("", "cannot be empty"),
        ("a" * (REFERENCE_MAX_LENGTH + 1), f"at most {REFERENCE_MAX_LENGTH} characters"),
        ("a" * (NAME_MAX_LENGTH + 1), f"an image name has at most {NAME_MAX_LENGTH}"),
    ],
)
def test_invalid_references_say_which_rule_they_break(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_image_reference(text)
    assert reason in str(raised.value)


@pytest.mark.parametrize(
    ("text", "segment"),
    [
        ("x/..y/z?", "x%2F..y%2Fz%3F"),
        ("sandfleet-test/busybox:latest", "sandfleet-test%2Fbusybox%3Alatest"),
        ("a b#c%d&e=f", "a%20b%23c%25d%26e%3Df"),
        ("sandfleet-j.1", "sandfleet-j.1"),
    ],
)
def test_url_path_segments_encode_every_reserved_character(text: str, segment: str) -> None:
    assert url_path_segment(text) == segment


@pytest.mark.parametrize("text", ["", ".", "..", "x/../../events?", "a/./b", "a//b", "a/"])
def test_dot_and_empty_parts_cannot_be_encoded(text: str) -> None:
    # dockerd and podman decode %2F, then resolve `..`: `images/x%2F..%2F..%2Fevents/json`
    # is redirected to `/events/json`.
    with pytest.raises(ValueError, match="cannot be a URL path segment"):
        url_path_segment(text)


# ---- properties ----

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "---"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_separator), draw(_alnum)]
    return "".join(parts)


_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,4}[a-zA-Z0-9])?", fullmatch=True)
_domains = st.one_of(
    st.just("localhost"),
    st.builds(
        lambda parts, port: ".".join(parts) + port,
        st.lists(_domain_component, min_size=2, max_size=3),
        st.sampled_from(["", ":5000", ":9"]),
    ),
)
_tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digests = st.sampled_from([("sha256", 64), ("sha512", 128)]).flatmap(
    lambda kind: st.text("0123456789abcdef", min_size=kind[1], max_size=kind[1]).map(
        lambda hex_text: f"{kind[0]}:{hex_text}"
    )
)


def _reads_as_built(reference: ImageReference) -> bool:
    """Without a domain, a first path component with a "." would be read as one."""
    first, slash, _ = reference.path.partition("/")
    return reference.domain is not None or not slash or "." not in first


references = st.builds(
    ImageReference,
    domain=st.none() | _domains,
    path=st.lists(path_components(), min_size=1, max_size=3).map("/".join),
    tag=st.none() | _tags,
    digest=st.none() | _digests,
).filter(_reads_as_built)


@given(references)
def test_every_grammatical_reference_round_trips(reference: ImageReference) -> None:
    text = str(reference)
    parsed = parse_image_reference(text)
    assert str(parsed) == text
    assert parsed == reference


_FORBIDDEN = [" ", "\t", "\n", "?", "#", "%", "\\", "\x00", "..", "/../", "/./", "//", "é"]


@given(references, st.sampled_from(_FORBIDDEN), st.data())
def test_a_forbidden_character_anywhere_is_refused(
    reference: ImageReference, forbidden: str, data: st.DataObject
) -> None:
    text = str(reference)
    at = data.draw(st.integers(0, len(text)))
    try:
        parsed = parse_image_reference(text[:at] + forbidden + text[at:])
    except ValueError:
        return
    # The one exception: ".." inside a tag (`a:x..y`), valid there and never a path segment.
    assert forbidden == ".."
    assert parsed.tag is not None and ".." in parsed.tag


@given(references)
def test_an_upper_case_repository_path_is_refused(reference: ImageReference) -> None:
    upper = ImageReference(reference.domain or "example.com", reference.path.upper())
    if upper.path != reference.path:  # it had letters
        with pytest.raises(ValueError, match="repository path component"):
            parse_image_reference(str(upper))


@given(st.text(max_size=80))
def test_any_text_is_refused_with_a_reason_or_round_trips_safely(text: str) -> None:
    try:
        parsed = parse_image_reference(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert str(parsed) == text
    assert not any(c.isspace() or c in "?#%\\" for c in text)
    assert not {".", ".."} & set(text.split("/"))
    assert parsed.path == parsed.path.lower()
    assert url_path_segment(text).count("/") == 0
