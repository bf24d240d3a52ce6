"""Where the redis-py suite connects, read from the environment that scripts/clients.sh sets.

CLIENTS_PORT         the server under test (the proxy, or a plain redis-server); required
CLIENTS_HOST         its address (default 127.0.0.1)
CLIENTS_SHARD_PORTS  comma-separated ports of the Redis servers behind it, read directly to
                     check where values landed; unset: the server under test is the store
CLIENTS_HTTP_PORT    the proxy's sidecar, for POST /admin/flush; unset: nothing to flush
"""

import os
import secrets
import urllib.request

import pytest
import redis

HOST = os.environ.get("CLIENTS_HOST", "127.0.0.1")


def _port():
    port = os.environ.get("CLIENTS_PORT")
    if not port:
        raise pytest.UsageError("CLIENTS_PORT is not set (run scripts/clients.sh)")
    return int(port)


@pytest.fixture(scope="session")
def port():
    return _port()


@pytest.fixture(scope="session")
def run_id():
    """One prefix per run, so runs never see each other's keys (no FLUSHALL through a proxy).
    No braces: a {hash tag} would put every key on one shard."""
    return "compat:py:" + secrets.token_hex(4)


@pytest.fixture
def prefix(run_id, request):
    return f"{run_id}:{request.node.name}:"


@pytest.fixture(scope="session")
def stores():
    """Direct connections to where the values live (the shards, or the server itself)."""
    ports = os.environ.get("CLIENTS_SHARD_PORTS")
    ports = [int(p) for p in ports.split(",")] if ports else [_port()]
    clients = [redis.Redis(host=HOST, port=p, protocol=2) for p in ports]
    yield clients
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def flush():
    """Lands the proxy's pending increments on the shards (a no-op against plain Redis)."""
    http = os.environ.get("CLIENTS_HTTP_PORT")

    def run():
        if not http:
            return
        req = urllib.request.Request(f"http://{HOST}:{http}/admin/flush", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status

    return run
