"""TLS to the broker: the context an amqps:// connection uses, built from the
SANDFLEET_BROKER_CA, _CERT and _KEY settings, and TLS failures in words.

Every problem is named by its setting, or by OpenSSL's reason without its decoration;
`sandfleet.common.amqp.connect` reports them as FleetUnreachable with a `TLS: ` reason.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sandfleet.common.settings import Settings


class TLSSettingsInvalid(ValueError):
    """A TLS setting names no usable file, or is given where it cannot apply."""


def tls_context(settings: Settings) -> ssl.SSLContext:
    """How an amqps:// connection checks the broker and shows itself.

    The broker's certificate must be signed by a CA in SANDFLEET_BROKER_CA (the
    system's CAs when unset) and name the URL's host. SANDFLEET_BROKER_CERT (with
    SANDFLEET_BROKER_KEY, or the key in the same file) is shown to a broker that asks
    for a client certificate. Raises TLSSettingsInvalid naming the setting and why.
    """
    context = _verifying(settings.broker_ca)
    cert, key = settings.broker_cert, settings.broker_key
    if cert is None and key is not None:
        raise TLSSettingsInvalid("SANDFLEET_BROKER_KEY is set without SANDFLEET_BROKER_CERT")
    if cert is not None:
        certfile = _readable("SANDFLEET_BROKER_CERT", cert)
        keyfile = None if key is None else _readable("SANDFLEET_BROKER_KEY", key)
        _loaded("SANDFLEET_BROKER_CERT", cert, lambda: context.load_cert_chain(certfile, keyfile))
    return context


def _verifying(ca: Path | None) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name (TLS 1.2
    at least), trusting only `ca`'s certificates when given, else the system's."""
    if ca is None:
        return ssl.create_default_context()
    cafile = _readable("SANDFLEET_BROKER_CA", ca)
    return _loaded("SANDFLEET_BROKER_CA", ca, lambda: ssl.create_default_context(cafile=cafile))


def tls_context_for(url: str, settings: Settings | None) -> ssl.SSLContext | None:
    """The TLS context for `url`; None for plain amqp://, which no TLS setting may
    accompany: they say the operator expects TLS, and the password would go in clear."""
    given = [] if settings is None else _tls_settings_given(settings)
    if urlsplit(url).scheme != "amqps":
        if given:
            raise TLSSettingsInvalid(
                f"{' and '.join(given)} set, but the URL is not amqps:// (plain AMQP,"
                " unencrypted): use amqps://, or unset them"
            )
        return None
    return ssl.create_default_context() if settings is None else tls_context(settings)


def _tls_settings_given(settings: Settings) -> list[str]:
    named = {
        "SANDFLEET_BROKER_CA": settings.broker_ca,
        "SANDFLEET_BROKER_CERT": settings.broker_cert,
        "SANDFLEET_BROKER_KEY": settings.broker_key,
    }
    return [setting for setting, value in named.items() if value is not None]


def _readable(setting: str, path: Path) -> str:
    """`path` as a string, once it is known to open: ssl's own errors name no file."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TLSSettingsInvalid(f"{setting}={path}: {exc.strerror or exc}") from None
    return str(path)


_T = TypeVar("_T")


def _loaded(setting: str, path: Path, load: Callable[[], _T]) -> _T:
    try:
        return load()
    except ssl.SSLError as exc:
        raise TLSSettingsInvalid(f"{setting}={path}: {_ssl_reason(exc)}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words, without the library tag and the C source line."""
    if "PEM lib" in str(exc):  # OpenSSL's word for any unreadable certificate or key
        return "not a PEM certificate and private key that belong together"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return _OPENSSL_DECORATION.sub("", text).strip() or type(exc).__name__


# "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)"
_OPENSSL_DECORATION = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")


def why_tls_failed(exc: BaseException, url: str) -> str | None:
    """Why an amqps:// connection failed in TLS, if it did; None if it did not."""
    causes = list(_causes(exc))
    ssl_error = next((e for e in causes if isinstance(e, ssl.SSLError)), None)
    if ssl_error is not None:
        hint = _TLS_HINTS.get(getattr(ssl_error, "reason", None) or "", "")
        return f"TLS: {_ssl_reason(ssl_error)}{hint}"
    if urlsplit(url).scheme == "amqps" and any(isinstance(e, _CUT_OFF) for e in causes):
        # TLS 1.3 refuses a client certificate after the handshake: the broker's alert
        # is often lost to the connection's reset, and this is all the client sees.
        return (
            "TLS: the broker closed the connection unanswered, as one that requires a"
            " client certificate does to a client that shows none it trusts"
            " (SANDFLEET_BROKER_CERT, SANDFLEET_BROKER_KEY)"
        )
    return None


_CUT_OFF = (ConnectionResetError, EOFError)
_TLS_HINTS = {
    "WRONG_VERSION_NUMBER": " (does this port speak TLS?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": " (SANDFLEET_BROKER_CERT, SANDFLEET_BROKER_KEY)",
}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
