"""SANDFLEET_BROKER_URL: one broker URL, or a comma-separated list of the URLs of one
RabbitMQ cluster's nodes.

    amqp://u:p@node1:5672/fleet,amqp://u:p@node2:5672/fleet,amqp://u:p@node3:5672/fleet

Every process connects to the first node that answers and moves on to the next when
its node goes away (`sandfleet.common.failover`). A list names one cluster, so its URLs
must agree on everything but the address: scheme (all amqp:// or all amqps://),
login and virtual host. A comma inside a password is written %2C.
"""

from __future__ import annotations

from urllib.parse import SplitResult, unquote, urlsplit

SCHEMES = ("amqp", "amqps")


def split_broker_urls(value: str) -> list[str]:
    """The URLs of `value`, in order (one for a plain URL)."""
    return [part.strip() for part in value.split(",")]


def check_broker_urls(value: str) -> str:
    """`value` if it is a usable list of several URLs; ValueError saying which URL is
    wrong and why. A single URL is left to the connection to judge, as before."""
    urls = split_broker_urls(value)
    if len(urls) == 1:
        return value
    first = _parts(urls[0], 1, len(urls))
    for number, url in enumerate(urls[1:], start=2):
        parts = _parts(url, number, len(urls))
        for what, mine, theirs in (
            ("scheme", parts.scheme, first.scheme),
            ("login", unquote(parts.username or ""), unquote(first.username or "")),
            ("virtual host", vhost_of(url), vhost_of(urls[0])),
        ):
            if mine != theirs:
                raise ValueError(
                    f"URL {number} of {len(urls)} has {what} {mine!r} but URL 1 has"
                    f" {theirs!r}: a list names the nodes of one cluster"
                )
    return ",".join(urls)


def _parts(url: str, number: int, count: int) -> SplitResult:
    where = f"URL {number} of {count}"
    if not url:
        raise ValueError(f"{where} is empty (a stray comma?)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what may raise
    except ValueError:
        # Not urllib's words: they quote the part that failed, maybe a password's.
        raise ValueError(
            f"{where} does not parse as scheme://login:password@host:port/vhost"
            " (a comma in a password is %2C)"
        ) from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{where} is not amqp:// or amqps:// (a comma in a password is %2C)")
    if not parts.hostname:
        raise ValueError(f"{where} names no host")
    return parts


def vhost_of(url: str) -> str:
    """The virtual host a URL (or a list's first, which all share) names; `/` if none."""
    path = urlsplit(split_broker_urls(url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def node_address(url: str) -> str:
    """`host:port` of one URL, for messages (no login, no password)."""
    return urlsplit(url).netloc.rpartition("@")[2]
