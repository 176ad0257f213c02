"""connect(): the first attempt is bounded and its failure is one FleetUnreachable that
names the URL with its password hidden and says why; nothing is left running. Over
amqps://, the broker is verified as the TLS settings say, and a TLS failure or a TLS
setting that cannot be used is named (against loopback TLS servers here; against a real
RabbitMQ TLS listener in tests/integration/test_tls.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.amqp import connect, redacted_url
from sandfleet.common.errors import FleetUnreachable
from sandfleet.common.settings import Settings
from sandfleet.common.tls import TLSSettingsInvalid, tls_context
from sandfleet.gateway.client import Client
from tests.support.tls_broker import PKI, Credential, make_pki


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqps://u:p%40ss@broker.example:5671/v%2Fh", "amqps://u:***@broker.example:5671/v%2Fh"),
        ("amqp://u:a@b@host/", "amqp://u:***@host/"),
        ("amqp://u:@host/", "amqp://u:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host/vhost", "amqp://host/vhost"),
    ],
)
def test_the_password_is_hidden(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_silent_broker_is_given_up_on_in_time(
    silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"amqp://u:pw-in-url@127.0.0.1:{silent_port}/"
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(5):
        with pytest.raises(FleetUnreachable) as raised:
            await connect(url, name="test", timeout=0.3)
    assert str(raised.value) == (
        f"cannot reach the fleet at amqp://u:***@127.0.0.1:{silent_port}/: "
        "no answer from the broker in time"
    )
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    # aio-pika's and aiormq's own account of the failure is not repeated in the logs
    assert not [r for r in caplog.records if r.name.startswith(("aiormq", "aio_pika"))]


async def test_a_refused_connection_says_so() -> None:
    with pytest.raises(FleetUnreachable) as raised:
        await connect("amqp://guest:secret@127.0.0.1:1/", name="test")
    assert (raised.value.url, raised.value.reason) == (
        "amqp://guest:***@127.0.0.1:1/",
        "Connection refused",
    )
    assert isinstance(raised.value, ConnectionError)  # retry-on-ConnectionError code retries


# --- TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> Settings:
    return Settings(broker_ca=ca, broker_cert=cert, broker_key=key)


def server_context(credential: Credential, *, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(credential.cert, credential.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


PeerCerts = asyncio.Queue[dict[str, Any] | None]


@asynccontextmanager
async def tls_server(context: ssl.SSLContext | None) -> AsyncIterator[tuple[int, PeerCerts]]:
    """A loopback server that completes the TLS handshake (none when `context` is None:
    it answers as a plain AMQP broker would), passes on the client's certificate, and
    hangs up."""
    peers: PeerCerts = asyncio.Queue()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.put_nowait(writer.get_extra_info("peercert"))
        if context is None:
            writer.write(b"AMQP\x00\x00\x09\x01")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1], peers


def common_name(certificate: Any) -> str:
    """The subject's common name of a certificate as Python's ssl module describes it."""
    [name] = [
        value for part in certificate["subject"] for key, value in part if key == "commonName"
    ]
    return str(name)


async def unreachable_reason(url: str, settings: Settings | None) -> str:
    async with asyncio.timeout(10):
        with pytest.raises(FleetUnreachable) as raised:
            await connect(url, name="test", settings=settings, timeout=5)
    assert raised.value.url == redacted_url(url)
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return raised.value.reason


def test_the_broker_is_verified_by_default() -> None:
    context = tls_context(tls_settings())
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_given_ca_is_the_only_one_trusted(pki: PKI) -> None:
    trusted = tls_context(tls_settings(ca=pki.ca)).get_ca_certs()
    assert [common_name(ca) for ca in trusted] == ["sandfleet test CA"]


async def test_the_client_certificate_is_shown_to_a_broker_that_asks(pki: PKI) -> None:
    settings = tls_settings(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    async with tls_server(server_context(pki.server, client_ca=pki.ca)) as (port, peers):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_context(settings))
        writer.close()
        async with asyncio.timeout(5):
            peer = await peers.get()
    assert peer is not None
    assert common_name(peer) == "sandfleet-client"


MakeSettings = Callable[[PKI, Path], Settings]
UNUSABLE_FILES: list[tuple[str, MakeSettings, str]] = [
    ("SANDFLEET_BROKER_CA", lambda _, scratch: tls_settings(ca=scratch / "missing.pem"),
     "No such file or directory"),
    ("SANDFLEET_BROKER_CA", lambda _, scratch: tls_settings(ca=scratch), "Is a directory"),
    ("SANDFLEET_BROKER_CA", lambda pki, _: tls_settings(ca=pki.client.key),
     "no certificate or crl found"),
    ("SANDFLEET_BROKER_CERT",
     lambda pki, scratch: tls_settings(cert=scratch / "missing.crt", key=pki.client.key),
     "No such file or directory"),
    ("SANDFLEET_BROKER_KEY",
     lambda pki, scratch: tls_settings(cert=pki.client.cert, key=scratch / "missing.key"),
     "No such file or directory"),
    ("SANDFLEET_BROKER_CERT", lambda pki, _: tls_settings(cert=pki.client.cert, key=pki.server.key),
     "key values mismatch"),
    ("SANDFLEET_BROKER_CERT", lambda pki, _: tls_settings(cert=pki.ca),  # no key in it
     "not a PEM certificate and private key that belong together"),
]  # fmt: skip


@pytest.mark.parametrize(("setting", "make_settings", "why"), UNUSABLE_FILES)
def test_a_tls_file_that_cannot_be_used_is_named_with_the_reason(
    pki: PKI,
    tmp_path: Path,
    setting: str,
    make_settings: MakeSettings,
    why: str,
) -> None:
    settings = make_settings(pki, tmp_path)
    path = {
        "SANDFLEET_BROKER_CA": settings.broker_ca,
        "SANDFLEET_BROKER_CERT": settings.broker_cert,
        "SANDFLEET_BROKER_KEY": settings.broker_key,
    }[setting]
    with pytest.raises(TLSSettingsInvalid) as raised:
        tls_context(settings)
    assert str(raised.value) == f"{setting}={path}: {why}"


async def test_a_tls_setting_is_refused_before_connecting(tmp_path: Path) -> None:
    settings = tls_settings(ca=tmp_path / "missing.pem")
    reason = await unreachable_reason("amqps://u:secret@127.0.0.1:1/", settings)
    assert (
        reason == f"TLS: SANDFLEET_BROKER_CA={tmp_path / 'missing.pem'}: No such file or directory"
    )


def test_a_key_needs_its_certificate(pki: PKI) -> None:
    with pytest.raises(
        TLSSettingsInvalid, match=r"^SANDFLEET_BROKER_KEY is set without SANDFLEET_BROKER_CERT$"
    ):
        tls_context(tls_settings(key=pki.client.key))


async def test_tls_settings_with_a_plain_url_are_refused(pki: PKI) -> None:
    # The operator expects TLS: the password must not go out in clear instead.
    settings = tls_settings(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    reason = await unreachable_reason("amqp://u:secret@127.0.0.1:1/", settings)
    assert reason == (
        "TLS: SANDFLEET_BROKER_CA and SANDFLEET_BROKER_CERT and SANDFLEET_BROKER_KEY set,"
        " but the URL is not amqps:// (plain AMQP, unencrypted): use amqps://, or unset them"
    )


async def test_a_broker_signed_by_another_ca_is_refused(pki: PKI) -> None:
    async with tls_server(server_context(pki.server)) as (port, _):
        url = f"amqps://u:secret@127.0.0.1:{port}/"
        reason = await unreachable_reason(url, tls_settings(ca=pki.stranger_ca))
    assert reason.startswith("TLS: certificate verify failed: "), reason


async def test_without_a_ca_setting_the_system_cas_decide(pki: PKI) -> None:
    async with tls_server(server_context(pki.server)) as (port, _):
        for settings in (None, tls_settings()):
            reason = await unreachable_reason(f"amqps://127.0.0.1:{port}/", settings)
            assert reason.startswith("TLS: certificate verify failed: "), reason


async def test_a_broker_certificate_for_another_host_is_refused(pki: PKI) -> None:
    async with tls_server(server_context(pki.elsewhere)) as (port, _):
        reason = await unreachable_reason(f"amqps://127.0.0.1:{port}/", tls_settings(ca=pki.ca))
    assert reason == (
        "TLS: certificate verify failed: IP address mismatch,"
        " certificate is not valid for '127.0.0.1'."
    )


async def test_a_port_without_tls_says_so(pki: PKI) -> None:
    async with tls_server(None) as (port, _):
        reason = await unreachable_reason(f"amqps://127.0.0.1:{port}/", tls_settings(ca=pki.ca))
    assert reason == "TLS: wrong version number (does this port speak TLS?)"


async def test_a_broker_that_hangs_up_after_the_handshake_points_at_client_certificates(
    pki: PKI,
) -> None:
    async with tls_server(server_context(pki.server)) as (port, _):
        reason = await unreachable_reason(f"amqps://127.0.0.1:{port}/", tls_settings(ca=pki.ca))
    assert reason.startswith("TLS: the broker closed the connection unanswered"), reason
    assert "SANDFLEET_BROKER_CERT" in reason


async def test_a_client_without_the_certificate_a_broker_requires_is_told_which_setting(
    pki: PKI,
) -> None:
    async with tls_server(server_context(pki.server, client_ca=pki.ca)) as (port, _):
        reason = await unreachable_reason(f"amqps://127.0.0.1:{port}/", tls_settings(ca=pki.ca))
    # The broker's alert, or (TLS 1.3 sends it after the handshake) the hang-up it ends with.
    assert reason.startswith("TLS: "), reason
    assert reason.endswith(" (SANDFLEET_BROKER_CERT, SANDFLEET_BROKER_KEY)"), reason


def refuse_without_a_certificate(listener: socket.socket, context: ssl.SSLContext) -> None:
    """Accept one client and fail its handshake for want of a certificate, as a broker
    does; then read what it sends until it hangs up, so that closing resets nothing and
    the alert reaches it."""
    listener.settimeout(10)
    raw, _ = listener.accept()
    raw.settimeout(10)
    with (
        raw,
        context.wrap_socket(raw.dup(), server_side=True, do_handshake_on_connect=False) as tls,
    ):
        with contextlib.suppress(ssl.SSLError):
            tls.do_handshake()
        while raw.recv(4096):
            pass


async def test_the_alert_that_a_client_certificate_is_required_points_at_the_setting(
    pki: PKI,
) -> None:
    context = server_context(pki.server, client_ca=pki.ca)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # A future, not a task: connect() leaves no task behind, and the test checks it.
        server = asyncio.get_running_loop().run_in_executor(
            None, refuse_without_a_certificate, listener, context
        )
        url = f"amqps://127.0.0.1:{listener.getsockname()[1]}/"
        reason = await unreachable_reason(url, tls_settings(ca=pki.ca))
        await server
    assert reason == (
        "TLS: tlsv13 alert certificate required (SANDFLEET_BROKER_CERT, SANDFLEET_BROKER_KEY)"
    )


async def test_a_client_takes_its_tls_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_BROKER_CA", str(tmp_path / "from-env.pem"))
    with pytest.raises(
        FleetUnreachable, match=r"SANDFLEET_BROKER_CA=.*/from-env\.pem: No such file"
    ):
        async with Client("amqps://u:secret@127.0.0.1:1/", connect_timeout=1):
            pass


async def test_a_client_takes_the_tls_settings_it_is_given(tmp_path: Path) -> None:
    settings = tls_settings(ca=tmp_path / "given.pem")
    with pytest.raises(FleetUnreachable, match=r"SANDFLEET_BROKER_CA=.*/given\.pem: No such file"):
        async with Client("amqps://u:secret@127.0.0.1:1/", settings=settings, connect_timeout=1):
            pass
