"""RabbitMQ nodes with a TLS listener, for tests of amqps:// connections.

Each is a second, separate node beside the shared one (rabbit@<host> on 5672, which
nothing here names or touches): its own node name, distribution port, data and log
directories, and an empty plugin list, so it takes no port of the shared node's. It
listens only on TLS, on a free loopback port, with a certificate the test's own CA
signed for 127.0.0.1 and localhost.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The node starts in a few seconds alone; the shared CI machine can make it much slower.
START_TIMEOUT_SECONDS = 120
WAIT_ROUND_SECONDS = 10
PID_FILE = "node.pid"  # in the node's directory; `rabbitmqctl wait` and `stop` read it
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """The certificates a test needs: its CA; the broker's (for 127.0.0.1 and
    localhost), a client's, and a server's for another host, all signed by it; and a
    CA that signed none of them."""

    ca: Path
    server: Credential
    client: Credential
    elsewhere: Credential
    stranger_ca: Path


@dataclass(frozen=True)
class TLSNode:
    """A running RabbitMQ node that speaks only TLS on `port`."""

    name: str
    port: int
    pki: PKI

    def url(self, host: str = "127.0.0.1", vhost: str = "") -> str:
        return f"amqps://guest:guest@{host}:{self.port}/{vhost}"


# --- certificates ------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


# A CA's key signs certificates (and revocation lists), nothing else.
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    server_names: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate `ca` signs: a server's for `server_names`, else a client's."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    server = server_names is not None
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names is not None:
        names = x509.SubjectAlternativeName(server_names)
        builder = builder.add_extension(names, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(
    directory: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Credential:
    cert, key = pair
    credential = Credential(directory / f"{stem}.crt", directory / f"{stem}.key")
    credential.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    credential.key.touch(mode=0o600)
    credential.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return credential


LOOPBACK_NAMES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]
ELSEWHERE = "broker.elsewhere.invalid"


def make_pki(directory: Path) -> PKI:
    """A fresh `PKI`, as PEM files in `directory` (keys 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("sandfleet test CA")
    elsewhere = _issue(ca, ELSEWHERE, server_names=[x509.DNSName(ELSEWHERE)])
    return PKI(
        ca=_write(directory, "ca", ca).cert,
        server=_write(directory, "server", _issue(ca, "localhost", server_names=LOOPBACK_NAMES)),
        client=_write(directory, "client", _issue(ca, "sandfleet-client")),
        elsewhere=_write(directory, "elsewhere", elsewhere),
        stranger_ca=_write(directory, "stranger-ca", _make_ca("sandfleet stranger CA")).cert,
    )


# --- the node ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(pki: PKI, port: int, *, require_client_cert: bool) -> str:
    fail_if_no_peer_cert = "true" if require_client_cert else "false"
    return "\n".join(
        [
            "listeners.tcp = none",
            f"listeners.ssl.default = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {pki.ca}",
            f"ssl_options.certfile = {pki.server.cert}",
            f"ssl_options.keyfile = {pki.server.key}",
            # A client certificate, when one is shown, must be signed by the CA.
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {fail_if_no_peer_cert}",
            "",
        ]
    )


def _environment(directory: Path, node: str) -> dict[str, str]:
    """Everything the node would otherwise share with the main one, made its own."""
    return {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(_free_port()),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        # No management plugin: it would reach for the shared node's port 15672.
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / PID_FILE),
    }


def _give_to_broker_user(directory: Path) -> None:
    """Debian's rabbitmq-server, run by root, runs the node as the `rabbitmq` user: the
    node's files (its server key among them) must be that user's."""
    if os.geteuid() != 0:
        return
    try:
        owner = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _rabbitmqctl(node: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", "-n", node, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class _Launched:
    node: TLSNode
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def pid_file(self) -> Path:
        return self.directory / PID_FILE


def _prepare(directory: Path, pki: PKI, *, require_client_cert: bool) -> TLSNode:
    """A node's name, port and files, in `directory`."""
    directory.mkdir()
    node = TLSNode(f"sandfleet-tls-{os.getpid()}-{directory.name}@localhost", _free_port(), pki)
    (directory / "rabbitmq.conf").write_text(
        _config(pki, node.port, require_client_cert=require_client_cert)
    )
    (directory / "rabbitmq-env.conf").write_text("")
    (directory / "enabled_plugins").write_text("[].\n")
    return node


def _start(node: TLSNode, directory: Path) -> _Launched:
    with (directory / "startup.log").open("wb") as output:
        process = subprocess.Popen(
            ["rabbitmq-server"],
            env=_environment(directory, node.name),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
    return _Launched(node, directory, process)


def _await_startup(launched: _Launched) -> TLSNode:
    """The node, once it serves; a clear error with its log's tail if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    # In rounds: one long `rabbitmqctl wait` would wait out its whole timeout for a node
    # that died before writing its pid file (and, run through su, cannot be cut short).
    while True:
        waited = _rabbitmqctl(
            launched.node.name, "wait", str(launched.pid_file),
            "--timeout", str(WAIT_ROUND_SECONDS), timeout=WAIT_ROUND_SECONDS + 60,
        )  # fmt: skip
        if waited.returncode == 0:
            return launched.node
        if launched.process.poll() is not None or time.monotonic() > deadline:
            break
    said = (waited.stdout + waited.stderr).strip() or "nothing"
    raise RuntimeError(
        f"the TLS test node {launched.node.name} did not start (node exit status"
        f" {launched.process.poll()}; rabbitmqctl wait said: {said})"
        f"\n{_log_tail(launched.directory)}"
    )


def _log_tail(directory: Path) -> str:
    logs = [directory / "startup.log", *sorted((directory / "log").glob("*.log"))]
    tails = []
    for log in logs:
        if log.is_file():
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(tails) or f"(no log in {directory})"


def _stop(launched: _Launched) -> None:
    """Stop the node and wait until its process is gone; kill what a failed stop left."""
    if launched.process.poll() is None:
        _rabbitmqctl(launched.node.name, "stop", str(launched.pid_file), timeout=60)
    try:
        launched.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_node(launched)
        launched.process.wait(timeout=30)


def _kill_node(launched: _Launched) -> None:
    # The node runs under su, in a session of its own: its own pid, not ours, is killed.
    try:
        os.kill(int(launched.pid_file.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        launched.process.kill()


@contextmanager
def running_tls_nodes(*, require_client_cert: Sequence[bool]) -> Iterator[list[TLSNode]]:
    """One TLS node per entry of `require_client_cert` (whether its listener refuses a
    client without a certificate), all with the same fresh PKI, started together (each
    takes seconds), stopped and removed at the end."""
    # Not pytest's tmp_path: its 0700 parents keep out the `rabbitmq` user.
    directory = Path(tempfile.mkdtemp(prefix="sandfleet-tls-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        pki = make_pki(directory / "pki")
        node_dirs = [directory / f"node{index}" for index in range(len(require_client_cert))]
        nodes = [
            _prepare(node_dir, pki, require_client_cert=required)
            for node_dir, required in zip(node_dirs, require_client_cert, strict=True)
        ]
        _give_to_broker_user(directory)
        launched = []
        for node, node_dir in zip(nodes, node_dirs, strict=True):
            launched.append(_start(node, node_dir))
            stack.callback(_stop, launched[-1])
        yield [_await_startup(each) for each in launched]
