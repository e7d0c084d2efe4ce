"""Every way of reaching Redis, against servers the suite starts: TLS with a CA and client
certificates it makes itself, a unix socket, an ACL user, and Redis Sentinel.

Each test acts on a real abandoned job through the connection under test and checks the
job's end state through RQ's API, so a connection that silently went elsewhere fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import trustme
from rq import Queue

from conftest import (
    STARTUP_TIMEOUT_S,
    RedisServer,
    WorkerFactory,
    _redis_server_binary,
    clean_env,
    free_port,
    run_opsctl,
    terminate,
    wait_for_status,
    wait_until,
)
from test_cli_fake import started_job, status_of

pytestmark = pytest.mark.redis_server

POLICY = """\
# yaml-language-server: $schema=../schemas/policy.schema.json
version: 1
{redis}
queues:
  - name: default
    action: fail
"""


@dataclass
class Server:
    """A redis-server (or sentinel) this module started, and a plain client to set it up."""

    process: subprocess.Popen[bytes]
    log_path: Path
    client: redis.Redis

    def stop(self) -> None:
        self.client.close()
        terminate(self.process)


def _launch(args: list[str], log_path: Path, client: Callable[[], redis.Redis]) -> Server:
    """Start redis-server with ``args``; return once ``client()`` gets an answer to PING."""
    binary = _redis_server_binary()
    command = [binary, *args, "--logfile", str(log_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = client()

    def answers() -> bool:
        if process.poll() is not None:
            return True
        try:
            return bool(conn.ping())
        except (redis.RedisError, OSError):
            return False

    if wait_until(answers, timeout=STARTUP_TIMEOUT_S) and process.poll() is None:
        return Server(process, log_path, conn)
    terminate(process)
    log = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
    pytest.fail(f"redis-server {args} did not start:\n{log}", pytrace=False)


def _plain_args(tmp: Path) -> list[str]:
    return ["--save", "", "--appendonly", "no", "--dir", str(tmp)]


def _opsctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = run_opsctl(*args, env={**clean_env(), **env})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _apply_json(policy: Path, *args: str, **env: str) -> dict[str, object]:
    result = _opsctl("apply", str(policy), "--format", "json", *args, **env)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def _policy(tmp_path: Path, redis_section: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(redis=redis_section))
    return path


# --- TLS ------------------------------------------------------------------------------------


@dataclass
class TlsServer:
    server: Server
    port: int
    ca_path: Path
    client_cert: Path  # the client's certificate and key in one PEM file
    client_key: Path


def _require_tls() -> None:
    """Skip (fail in CI) unless this redis-server was built with TLS.

    A build without it rejects tls-port as a bad directive; one with it starts, finds
    nothing to listen on (both ports 0) and exits.
    """
    probe = subprocess.run(
        [_redis_server_binary(), "--tls-port", "0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "Bad directive" not in probe.stdout + probe.stderr:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI must run the TLS tests: install a redis-server built with TLS")
    pytest.skip("this redis-server was built without TLS")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A redis-server on a TLS port only, with a certificate for "localhost" from a fresh CA,
    asking clients for a certificate but not requiring one."""
    _require_tls()
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server_cert.private_key_pem.write_to_path(str(tmp / "server.key"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp / "server.crt"))
    client = ca.issue_cert("opsctl-client")
    client.cert_chain_pems[0].write_to_path(str(tmp / "client.crt"))
    client.private_key_pem.write_to_path(str(tmp / "client.key"))

    port = free_port()
    args = ["--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port)]
    args += ["--tls-cert-file", str(tmp / "server.crt"), "--tls-key-file", str(tmp / "server.key")]
    args += ["--tls-ca-cert-file", str(tmp / "ca.pem"), "--tls-auth-clients", "optional"]

    def client_conn() -> redis.Redis:
        return redis.Redis(host="localhost", port=port, ssl=True, ssl_ca_certs=str(tmp / "ca.pem"))

    server = _launch(args + _plain_args(tmp), tmp / "redis.log", client_conn)
    yield TlsServer(server, port, tmp / "ca.pem", tmp / "client.crt", tmp / "client.key")
    server.stop()


def test_apply_over_tls_with_the_ca_from_the_command_line_fails_the_job(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    conn = tls_server.server.client
    job = started_job(conn, "gone-worker")
    url = f"rediss://localhost:{tls_server.port}/0"

    report = _apply_json(
        _policy(tmp_path), "--redis-url", url, "--tls-ca-cert", str(tls_server.ca_path)
    )

    assert report["redis"] == url
    assert status_of(conn, job.id) == "failed"


def test_tls_without_the_ca_refuses_the_unknown_certificate_with_exit_3(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"

    result = _opsctl("status", "--redis-url", url)

    assert result.returncode == 3, result.stderr
    assert "certificate" in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_server_that_requires_a_client_certificate_gets_named_as_the_likely_cause(
    tls_server: TlsServer,
) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"
    ca = str(tls_server.ca_path)
    conn = tls_server.server.client
    conn.config_set("tls-auth-clients", "yes")
    try:
        without = _opsctl("status", "--redis-url", url, "--tls-ca-cert", ca)
        cert, key = str(tls_server.client_cert), str(tls_server.client_key)
        given = ["--tls-cert", cert, "--tls-key", key]
        with_one = _opsctl("status", "--redis-url", url, "--tls-ca-cert", ca, *given)
    finally:
        conn.config_set("tls-auth-clients", "optional")

    assert without.returncode == 3, without.stderr
    assert "if it requires a client certificate, give one with --tls-cert" in without.stderr
    assert with_one.returncode == 0, with_one.stderr


def test_host_name_check_refuses_an_address_the_certificate_does_not_name(
    tls_server: TlsServer,
) -> None:
    url = f"rediss://127.0.0.1:{tls_server.port}/0"
    ca = str(tls_server.ca_path)

    full = _opsctl("status", "--redis-url", url, "--tls-ca-cert", ca)
    certificate_only = _opsctl(
        "status", "--redis-url", url, "--tls-ca-cert", ca, "--tls-verify", "certificate"
    )

    assert full.returncode == 3, full.stderr
    assert certificate_only.returncode == 0, certificate_only.stderr


def test_tls_verify_none_connects_without_a_ca_and_warns(tls_server: TlsServer) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"

    result = _opsctl("status", "--redis-url", url, "--tls-verify", "none")

    assert result.returncode == 0, result.stderr
    assert "checks are off" in result.stderr


def test_tls_settings_from_the_policy_with_variables_and_a_client_certificate(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    conn = tls_server.server.client
    job = started_job(conn, "gone-worker")
    section = """redis:
  url: rediss://localhost:${TLS_PORT}/0
  tls:
    ca_cert: ${TLS_DIR}/ca.pem
    cert: ${TLS_DIR}/client.crt
    key: ${TLS_DIR}/client.key
    verify: full"""
    policy = _policy(tmp_path, section)
    env = {"TLS_PORT": str(tls_server.port), "TLS_DIR": str(tls_server.ca_path.parent)}

    assert _opsctl("validate", str(policy), **env).returncode == 0
    _apply_json(policy, **env)

    assert status_of(conn, job.id) == "failed"


def test_command_line_tls_option_beats_the_policys(tls_server: TlsServer, tmp_path: Path) -> None:
    section = f"""redis:
  url: rediss://localhost:{tls_server.port}/0
  tls:
    ca_cert: {tmp_path / "missing-ca.pem"}"""
    policy = _policy(tmp_path, section)

    from_policy = _opsctl("apply", str(policy), "--dry-run")
    overridden = _opsctl(
        "apply", str(policy), "--dry-run", "--tls-ca-cert", str(tls_server.ca_path)
    )

    assert from_policy.returncode == 2, from_policy.stderr
    assert "missing-ca.pem" in from_policy.stderr and "cannot be read" in from_policy.stderr
    assert overridden.returncode == 0, overridden.stderr


def _tls_mistake(tls_server: TlsServer, tmp: Path, mistake: str) -> list[str]:
    """TLS options with one file of the wrong kind (the others are right)."""
    ca, cert, key = str(tls_server.ca_path), str(tls_server.client_cert), str(tls_server.client_key)
    not_pem = tmp / "notes.txt"
    not_pem.write_text("not a certificate\n")
    if mistake == "ca is a directory":
        ca = str(tmp)
    elif mistake == "ca is not a certificate":
        ca = str(not_pem)
    elif mistake == "cert is not a certificate":
        cert = str(not_pem)
    elif mistake == "key of another certificate":
        key_path = tmp / "other.key"
        trustme.CA().issue_cert("elsewhere").private_key_pem.write_to_path(str(key_path))
        key = str(key_path)
    elif mistake == "key is encrypted":
        from cryptography.hazmat.primitives import serialization

        plain = serialization.load_pem_private_key(tls_server.client_key.read_bytes(), None)
        key_path = tmp / "encrypted.key"
        key_path.write_bytes(
            plain.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        key = str(key_path)
    return ["--tls-ca-cert", ca, "--tls-cert", cert, "--tls-key", key]


TLS_FILE_MISTAKES = {
    "ca is a directory": "is not a regular file",
    "ca is not a certificate": "holds no CA certificate in PEM form",
    "cert is not a certificate": "are not a PEM certificate and its private key",
    "key of another certificate": "are not a PEM certificate and its private key",
    "key is encrypted": "the private key is encrypted; opsctl takes no key password",
}


@pytest.mark.parametrize("mistake", sorted(TLS_FILE_MISTAKES))
def test_a_tls_file_of_the_wrong_kind_is_a_setting_to_mend_exit_2(
    tls_server: TlsServer, tmp_path: Path, mistake: str
) -> None:
    conn = tls_server.server.client
    job = started_job(conn, "gone-worker")
    url = f"rediss://localhost:{tls_server.port}/0"
    policy = _policy(tmp_path, f"redis:\n  url: {url}")

    result = _opsctl("apply", str(policy), *_tls_mistake(tls_server, tmp_path, mistake))

    # Not 3 ("cannot reach Redis"), which --best-effort and deploy hooks let pass.
    assert result.returncode == 2, result.stderr
    assert TLS_FILE_MISTAKES[mistake] in result.stderr
    assert "cannot reach" not in result.stderr
    assert status_of(conn, job.id) == "started"


def test_tls_options_on_a_plain_redis_url_are_refused_with_exit_2(tmp_path: Path) -> None:
    result = _opsctl(
        "status", "--redis-url", "redis://127.0.0.1:1/0", "--tls-ca-cert", "/nonexistent"
    )

    assert result.returncode == 2
    assert "rediss://" in result.stderr


# --- unix socket ----------------------------------------------------------------------------


def test_apply_through_a_unix_socket_acts_on_the_database_the_url_names(
    tmp_path: Path,
) -> None:
    socket_path = tmp_path / "redis.sock"
    args = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]

    def client(db: int = 0) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(socket_path), db=db)

    server = _launch(args + _plain_args(tmp_path), tmp_path / "redis.log", client)
    db2 = client(2)
    try:
        job = started_job(db2, "gone-worker")
        url = f"unix://{socket_path}?db=2"

        report = _apply_json(_policy(tmp_path), "--redis-url", url)

        assert report["summary"]["acted"] == 1  # type: ignore[index]
        assert status_of(db2, job.id) == "failed"
    finally:
        db2.close()
        server.stop()


# --- ACL users ------------------------------------------------------------------------------


@pytest.fixture
def acl_user(redis_server: RedisServer, redis_url: str) -> Iterator[tuple[str, str]]:
    """A Redis ACL user with every right on the private server (name, password)."""
    admin = redis_server.client()
    name, password = "deployer", "s3cret#pass/word"
    admin.acl_setuser(
        name, enabled=True, passwords=[f"+{password}"], keys="*", channels="*", commands=["+@all"]
    )
    yield name, password
    admin.acl_deluser(name)
    admin.close()


def test_acl_user_and_password_from_the_policy_log_in_and_are_never_shown(
    redis_server: RedisServer, redis_conn: redis.Redis, acl_user: tuple[str, str], tmp_path: Path
) -> None:
    name, password = acl_user
    job = started_job(redis_conn, "gone-worker")
    section = f"""redis:
  url: redis://127.0.0.1:{redis_server.port}/0
  username: {name}
  password: ${{OPS_REDIS_PASSWORD}}"""
    policy = _policy(tmp_path, section)

    result = _opsctl(
        "apply", str(policy), "-vv", "--log-format", "json", OPS_REDIS_PASSWORD=password
    )

    assert result.returncode == 0, result.stderr
    assert status_of(redis_conn, job.id) == "failed"
    assert password not in result.stdout + result.stderr


def test_redis_username_option_with_the_password_in_the_url(
    redis_server: RedisServer, redis_conn: redis.Redis, acl_user: tuple[str, str]
) -> None:
    name, password = acl_user
    encoded = quote(password, safe="")
    url = f"redis://:{encoded}@127.0.0.1:{redis_server.port}/0"

    ok = _opsctl("status", "--redis-url", url, "--redis-username", name, "--format", "json")
    wrong_user = _opsctl("status", "--redis-url", url, "--redis-username", "nobody")

    assert ok.returncode == 0, ok.stderr
    assert wrong_user.returncode == 3
    assert "refused the login" in wrong_user.stderr
    for result in (ok, wrong_user):
        assert password not in result.stdout + result.stderr
        assert encoded not in result.stdout + result.stderr


@pytest.mark.parametrize("userinfo", ["{name}@", "{name}:@"])
def test_a_user_in_the_url_without_a_password_takes_the_policys_password(
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    acl_user: tuple[str, str],
    tmp_path: Path,
    userinfo: str,
) -> None:
    name, password = acl_user
    job = started_job(redis_conn, "gone-worker")
    at = userinfo.format(name=name)
    section = f"""redis:
  url: redis://{at}127.0.0.1:{redis_server.port}/0
  password: ${{OPS_REDIS_PASSWORD}}"""
    policy = _policy(tmp_path, section)

    result = _opsctl("apply", str(policy), OPS_REDIS_PASSWORD=password)

    assert result.returncode == 0, result.stderr
    assert status_of(redis_conn, job.id) == "failed"
    assert password not in result.stdout + result.stderr


def test_a_user_in_the_url_without_any_password_is_told_where_the_password_goes(
    redis_server: RedisServer, acl_user: tuple[str, str]
) -> None:
    name, _ = acl_user

    result = _opsctl("status", "--redis-url", f"redis://{name}@127.0.0.1:{redis_server.port}/0")

    assert result.returncode == 3, result.stderr
    assert "the URL gives a user name and no password" in result.stderr
    assert "redis://NAME:PASSWORD@host" in result.stderr


@pytest.mark.parametrize("userinfo", ["alice:pw@", "alice@"], ids=["with-password", "lone-user"])
def test_a_user_in_the_url_and_another_in_the_options_is_refused(
    redis_server: RedisServer, userinfo: str
) -> None:
    url = f"redis://{userinfo}127.0.0.1:{redis_server.port}/0"

    result = _opsctl("status", "--redis-url", url, "--redis-username", "bob")

    assert result.returncode == 2
    assert "give the user in one place" in result.stderr
    assert ":pw@" not in result.stderr


# --- Redis Sentinel ------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    master: Server
    master_port: int
    sentinel: Server
    sentinel_port: int


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A master redis-server and one sentinel (redis-server --sentinel) monitoring it as
    "opsmaster"; returned once the sentinel names that master."""
    tmp = tmp_path_factory.mktemp("sentinel")
    master_port = free_port()
    master = _launch(
        ["--bind", "127.0.0.1", "--port", str(master_port), *_plain_args(tmp)],
        tmp / "master.log",
        lambda: redis.Redis(host="127.0.0.1", port=master_port),
    )
    sentinel_port = free_port()
    config = tmp / "sentinel.conf"
    config.write_text(
        f"bind 127.0.0.1\nport {sentinel_port}\ndir {tmp}\n"
        f"sentinel monitor opsmaster 127.0.0.1 {master_port} 1\n"
    )
    try:
        watcher = _launch(
            [str(config), "--sentinel"],
            tmp / "sentinel.log",
            lambda: redis.Redis(host="127.0.0.1", port=sentinel_port),
        )
    except BaseException:
        master.stop()
        raise

    def names_master() -> bool:
        try:
            found = watcher.client.execute_command(
                "SENTINEL", "get-master-addr-by-name", "opsmaster"
            )
        except redis.RedisError:
            return False
        return bool(found) and int(found[1]) == master_port

    try:
        assert wait_until(names_master, timeout=STARTUP_TIMEOUT_S), config.read_text()
        yield SentinelSetup(master, master_port, watcher, sentinel_port)
    finally:
        watcher.stop()
        master.stop()


@pytest.mark.parametrize("form", ["url", "flags", "policy", "env"])
def test_sentinel_finds_the_master_and_the_job_there_is_failed(
    sentinel: SentinelSetup, tmp_path: Path, form: str
) -> None:
    db3 = redis.Redis(host="127.0.0.1", port=sentinel.master_port, db=3)
    job = started_job(db3, "gone-worker")
    address = f"127.0.0.1:{sentinel.sentinel_port}"
    args: list[str] = []
    env: dict[str, str] = {}
    section = ""
    if form == "url":
        args = ["--redis-url", f"redis+sentinel://{address}/opsmaster/3"]
    elif form == "flags":
        args = ["--sentinel", address, "--sentinel-service", "opsmaster", "--sentinel-db", "3"]
    elif form == "env":
        env = {
            "OPSCTL_SENTINEL": address,
            "OPSCTL_SENTINEL_SERVICE": "opsmaster",
            "OPSCTL_SENTINEL_DB": "3",
        }
    else:
        section = f"""redis:
  sentinel:
    hosts: ["{address}"]
    service: opsmaster
    db: 3"""

    try:
        report = _apply_json(_policy(tmp_path, section), *args, **env)

        assert report["summary"]["acted"] == 1, report  # type: ignore[index]
        assert status_of(db3, job.id) == "failed"
    finally:
        db3.close()


def test_sentinel_that_knows_no_such_service_exits_3(sentinel: SentinelSetup) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel.sentinel_port}/nosuchservice/0"

    result = _opsctl("status", "--redis-url", url)

    assert result.returncode == 3, result.stderr
    assert "no sentinel" in result.stderr and "named a master" in result.stderr


def test_a_sentinel_url_aimed_at_a_plain_redis_says_what_that_server_answered(
    redis_server: RedisServer,
) -> None:
    url = f"redis+sentinel://127.0.0.1:{redis_server.port}/mymaster"

    result = _opsctl("status", "--redis-url", url)

    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line.endswith(
        "named a master: ResponseError: unknown command 'SENTINEL', "
        "with args beginning with: 'MASTERS'"
    ), line


def test_a_sentinel_that_refuses_the_login_is_named_with_where_its_password_goes(
    tmp_path: Path,
) -> None:
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", "sentinel-secret"]
    guarded = _launch(
        args + _plain_args(tmp_path),
        tmp_path / "redis.log",
        lambda: redis.Redis(port=port, password="sentinel-secret"),
    )
    try:
        result = _opsctl("status", "--redis-url", f"redis+sentinel://127.0.0.1:{port}/mymaster")
    finally:
        guarded.stop()

    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert "named a master: AuthenticationError: " in line, line
    assert line.endswith(
        "(a sentinel refused the login: give the sentinels' own password as the policy's "
        "redis.sentinel.password)"
    ), line


def test_sentinel_and_redis_url_together_are_refused_with_exit_2(sentinel: SentinelSetup) -> None:
    result = _opsctl(
        "status",
        "--redis-url",
        f"redis://127.0.0.1:{sentinel.master_port}/0",
        "--sentinel",
        f"127.0.0.1:{sentinel.sentinel_port}",
        "--sentinel-service",
        "opsmaster",
    )

    assert result.returncode == 2
    assert "not both" in result.stderr


def test_a_refused_command_names_the_user_given_apart_from_the_url(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    admin = redis_server.client()
    admin.acl_setuser(
        "no-writes",
        enabled=True,
        passwords=["+pw-no-writes"],
        keys="*",
        channels="*",
        commands=["+@all", "-set"],
    )
    try:
        section = f"""redis:
  url: redis://127.0.0.1:{redis_server.port}/0
  username: no-writes
  password: pw-no-writes"""

        result = _opsctl("apply", str(_policy(tmp_path, section)))
    finally:
        admin.acl_deluser("no-writes")
        admin.close()

    assert result.returncode == 3, result.stderr
    assert "Redis user 'no-writes' lacks a permission" in result.stderr
    assert "pw-no-writes" not in result.stderr + result.stdout


#: How servers that are not Redis answer: once, as a web server does, and then
#: hang up; or "+OK" to every command, for as long as the client talks.
NOT_REDIS = {"web": (b"HTTP/1.0 400 Bad Request\r\n\r\n", False), "ok": (b"+OK\r\n", True)}


@pytest.fixture(params=sorted(NOT_REDIS))
def not_redis(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL on 127.0.0.1 where a server that is not Redis listens."""
    answer, keeps_answering = NOT_REDIS[request.param]
    listener = socket.create_server(("127.0.0.1", 0))

    def talk(client: socket.socket) -> None:
        with client:
            while client.recv(65536):
                client.sendall(answer)
                if not keeps_answering:
                    return

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=talk, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    listener.close()


@pytest.mark.parametrize("command", [("status",), ("history",), ("apply", "--dry-run")])
def test_a_server_that_is_not_redis_is_unreachable_redis_exit_3(
    not_redis: str, tmp_path: Path, command: tuple[str, ...]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nqueues:\n  - name: default\n")
    args = [command[0], *([str(policy)] if command[0] == "apply" else []), *command[1:]]

    result = run_opsctl(*args, "--redis-url", not_redis, "--timeout", "2")

    assert result.returncode == 3, result.stderr
    assert f"{not_redis} does not answer as Redis does" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_database_the_server_does_not_have_is_a_setting_to_mend_exit_2(redis_url: str) -> None:
    missing_db = redis_url.rpartition("/")[0] + "/99"  # a server has 16 unless told otherwise

    result = run_opsctl("status", "--redis-url", missing_db)

    assert result.returncode == 2, result.stderr
    assert f"Redis at {missing_db} has no such database" in result.stderr


def test_apply_against_a_read_only_replica_exits_3_and_names_it_while_a_dry_run_reads_there(
    redis_server: RedisServer, redis_conn: redis.Redis, rq_workers: WorkerFactory, tmp_path: Path
) -> None:
    job = started_job(redis_conn, "w-dead")
    # A live worker holds its connections on the primary: the replica sees none of them.
    rq_workers.start(["default"], name="w-live")
    running = Queue("default", connection=redis_conn).enqueue("jobs.sleep_for", 30)
    assert wait_for_status(redis_conn, running.id, "started") == "started"
    port = free_port()
    follows = ["--replicaof", "127.0.0.1", str(redis_server.port)]
    replica = _launch(
        ["--bind", "127.0.0.1", "--port", str(port), *_plain_args(tmp_path), *follows],
        tmp_path / "replica.log",
        lambda: redis.Redis(host="127.0.0.1", port=port),
    )
    try:
        synced = lambda: replica.client.hget(f"rq:job:{running.id}", "status") == b"started"  # noqa: E731
        assert wait_until(synced, timeout=20)
        policy = _policy(tmp_path)
        url = f"redis://127.0.0.1:{port}/0"

        refused = _opsctl("apply", str(policy), "--redis-url", url)
        previewed = _opsctl(
            "apply", str(policy), "--redis-url", url, "--dry-run", "--format", "json"
        )
        preview = json.loads(previewed.stdout)
        # Its link to its primary down (no such client in its list), it is a replica still.
        replica.client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        unlinked = _apply_json(policy, "--redis-url", url, "--dry-run")
    finally:
        replica.stop()

    assert refused.returncode == 3, refused.stderr
    assert "read-only replica" in refused.stderr and "primary" in refused.stderr
    assert f"127.0.0.1:{port}" in refused.stderr
    assert status_of(redis_conn, job.id) == "started"  # nothing was changed
    assert previewed.returncode == 0, previewed.stderr
    # Said once, though the run reads the workers more than once.
    assert previewed.stderr.count("worker liveness is read from the worker hashes") == 1
    states = {j["id"]: (j["state"], j["outcome"]) for j in preview["jobs"]}
    # Its hash says the dead worker is alive, as RQ itself would read it; the live one
    # is never taken for dead for want of connections the replica cannot see.
    assert states[running.id] == ("running", "kept")
    assert preview["workers"] == []  # no registration of the live worker would be removed
    still = {j["id"]: (j["state"], j["outcome"]) for j in unlinked["jobs"]}  # type: ignore[index, union-attr]
    assert still[running.id] == ("running", "kept")
