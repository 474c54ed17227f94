"""A federation that lets no one in: TLS and SuperNode authentication on Flower 1.42, tried the way an attacker would.

One SuperLink per module (TLS with a CA of its own, ``--enable-supernode-auth``) on a free 127.0.0.1 port; each
test starts its SuperNodes against it, every process stopped by PID; the module ends by asserting that nothing is
left listening on its ports. What a node may *send* (reply checks) is tested in test_flower.py; a whole run with an
unenrolled node refused, and a second claim of a partition under TLS, are test_flower_runtimes.py's loopback
deployments.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Processes, free_loopback_ports, listening

pytest.importorskip("flwr")  # the [flower] extra (CI installs it)
pytest.importorskip("cryptography")

from fpl_fast.flower import deploy  # noqa: E402
from fpl_fast.flower.credentials import make_certs, make_node_key, superlink_tls_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0  # s for the SuperLink to answer, a node to come online or to be refused (a loaded CI machine)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode start their helpers by name
    }


def _text(log: Path) -> str:
    return ANSI.sub("", log.read_text(errors="replace"))


class Link:
    """The module's SuperLink and what the tests need to reach it."""

    def __init__(self, root: Path, procs: Processes) -> None:
        self.root, self.procs = root, procs
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.env = _env(self.home)
        self.tls = root / "tls"
        make_certs(self.tls)
        self.port, *self.node_ports = free_loopback_ports(8)
        self.used = [self.port]  # the ports this module's processes listen on
        self.address = f"127.0.0.1:{self.port}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "link"\n\n[superlink.link]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.tls / "ca.pem"}"\n'
        )
        cmd = [str(BIN / "flower-superlink"), *superlink_tls_args(self.tls), "--enable-supernode-auth"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        self.proc = procs.start(cmd, root / "superlink.log", self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while self.online() is None:
            assert self.proc.poll() is None, _text(root / "superlink.log")[-3000:]
            assert time.monotonic() < deadline, "the SuperLink did not answer: " + _text(root / "superlink.log")[-3000:]
            time.sleep(0.5)

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def online(self) -> int | None:
        """SuperNodes online (None: the Control API did not answer)."""
        proc = self.flwr("supernode", "list", "link", "--format", "json")
        try:
            nodes = json.loads(proc.stdout)["nodes"]
        except (ValueError, KeyError):
            return None
        return sum(n.get("status") == "online" for n in nodes)

    def key(self, name: str, *, enrol: bool) -> Path:
        private, public = make_node_key(self.root / "keys" / name)
        if enrol:
            proc = self.flwr("supernode", "register", str(public), "link")
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return private

    def supernode(self, name: str, *options: str) -> tuple[subprocess.Popen[bytes], Path]:
        """A SuperNode with ``options`` (TLS and key) against this SuperLink, giving up after 2 failed retries."""
        log = self.root / f"supernode-{name}.log"
        cmd = [str(BIN / "flower-supernode"), *options, "--superlink", self.address, "--max-retries", "2"]
        self.used.append(self.node_ports.pop())
        cmd += ["--host", "127.0.0.1", "--port", str(self.used[-1]), "--node-config", "partition-id=0"]
        return self.procs.start(cmd, log, self.env), log

    def refused(self, proc: subprocess.Popen[bytes], log: Path) -> str:
        """The node's last log lines once it has exited (it must exit, and never have come online)."""
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node was not refused within {START_TIMEOUT:g} s: " + _text(log)[-3000:])
        assert proc.returncode != 0
        assert self.online() == 0  # it never joined
        return _text(log)


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    procs = Processes()
    root = tmp_path_factory.mktemp("link")
    try:
        lk = Link(root, procs)
        yield lk
    finally:
        procs.stop_all()
    if "lk" in locals():  # every process the module started has stopped: nothing listens on its ports any more
        left = [p for p in lk.used if listening(p)]
        assert not left, f"still listening on {left}"
        assert all(p.poll() is not None for p in procs.started)


# ------------------------------------------------------------------------------------------
# The credentials
# ------------------------------------------------------------------------------------------
def test_certs_and_node_keys_are_0600_valid_for_loopback_and_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy.main(["certs", str(tmp_path / "tls")]) == 0
    assert deploy.main(["node-key", str(tmp_path / "node-0")]) == 0
    for key in (tmp_path / "tls" / "ca.key", tmp_path / "tls" / "server.key", tmp_path / "node-0"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert (tmp_path / "node-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        deploy.main(["certs", str(tmp_path / "tls")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "keys are never overwritten" in err, err
    with pytest.raises(SystemExit):
        deploy.main(["certs"])  # `deploy certs` without a folder is not an app folder named "certs"
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: certs needs a folder: python -m fpl_fast.flower.deploy certs FOLDER")
    )
    # The server certificate verifies against the CA for 127.0.0.1 and localhost, and against no other CA.
    ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
    other = tmp_path / "other"
    make_certs(other)
    for host, cafile, ok in [("127.0.0.1", None, True), ("localhost", None, True), ("127.0.0.1", other, False)]:
        client = ctx if cafile is None else ssl.create_default_context(cafile=str(cafile / "ca.pem"))
        assert _handshake(tmp_path / "tls", client, host) == ok, (host, cafile)


def _handshake(tls: Path, client: ssl.SSLContext, host: str) -> bool:
    """Whether a TLS client with ``client``'s trust completes a handshake with a server using tls/server.pem."""
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def serve() -> None:
            conn, _ = srv.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=host):
                    ok = True
        except ssl.SSLError:
            ok = False
        t.join(timeout=10)
    return ok


# ------------------------------------------------------------------------------------------
# Against the module's TLS + node-authentication SuperLink
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_enrolled_node_with_the_ca_is_admitted(link: Link) -> None:
    """The control: what the attacks below lack is all they lack."""
    key = link.key("enrolled", enrol=True)
    proc, log = link.supernode(
        "enrolled", "--root-certificates", str(link.tls / "ca.pem"), "--auth-supernode-private-key", str(key)
    )
    deadline = time.monotonic() + START_TIMEOUT
    while link.online() != 1:
        assert proc.poll() is None, _text(log)[-3000:]
        assert time.monotonic() < deadline, _text(log)[-3000:]
        time.sleep(0.5)
    link.procs.stop(proc)
    deadline = time.monotonic() + START_TIMEOUT
    while link.online() != 0:  # a node that stops leaves the federation
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.mark.slow
def test_a_node_whose_key_is_not_enrolled_is_refused(link: Link) -> None:
    key = link.key("unenrolled", enrol=False)
    proc, log = link.supernode(
        "unenrolled", "--root-certificates", str(link.tls / "ca.pem"), "--auth-supernode-private-key", str(key)
    )
    text = link.refused(proc, log)
    assert "Failed to initialize the connection to the SuperLink." in text, text[-3000:]
    assert "[code: 2004] Failed to activate SuperNode." in text, text[-3000:]


@pytest.mark.slow
def test_a_node_that_does_not_trust_the_ca_cannot_connect(link: Link, tmp_path: Path) -> None:
    """An enrolled key does not help a node that trusts another CA: the TLS handshake fails first."""
    key = link.key("other-ca", enrol=True)
    make_certs(tmp_path / "other")
    proc, log = link.supernode(
        "other-ca", "--root-certificates", str(tmp_path / "other" / "ca.pem"), "--auth-supernode-private-key", str(key)
    )
    text = link.refused(proc, log)
    assert "SSL/TLS handshake error detected." in text, text[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]


@pytest.mark.slow
def test_a_plain_client_against_the_tls_superlink_fails(link: Link) -> None:
    """A SuperNode without TLS (``--insecure``), ``flwr`` without TLS and a raw HTTP request all fail."""
    proc, log = link.supernode("plain", "--insecure")
    text = link.refused(proc, log)
    assert "Failed to initialize the connection to the SuperLink." in text, text[-3000:]
    plain_home = link.root / "plain-home"
    plain_home.mkdir()
    (plain_home / "config.toml").write_text(
        f'[superlink]\ndefault = "link"\n\n[superlink.link]\naddress = "{link.address}"\ninsecure = true\n'
    )
    cli = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "link", "--format", "json"],
        env=_env(plain_home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    answer = json.loads(cli.stdout)  # flwr exits 0 and says it failed
    assert answer["success"] is False and "Connection to the SuperLink is unavailable" in answer["error-message"]
    with socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(10)
        try:
            reply = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"HTTP/"), reply  # the TLS server answers no plain HTTP
