"""redis-py against the server under test: what an application gets with redis-py's default
settings first (8.x speaks RESP3: HELLO 3), then with protocol=2 and protocol=3 spelt out.

Every test asserts exact values and the Python types redis-py hands back, which is where a
protocol mismatch shows (a dict from HGETALL, a set from SMEMBERS, a float from ZSCORE).
Pipelines use transaction=False: MULTI is not supported by tallyproxy.
"""

import asyncio
import threading

import pytest
import redis
import redis.asyncio

from conftest import HOST

# The three ways an application opens a client; "default" passes no protocol at all.
PROTOCOLS = {"default": {}, "resp2": {"protocol": 2}, "resp3": {"protocol": 3}}
# What each one must end up speaking on the wire (redis-py >= 8 defaults to RESP3).
EXPECTED_PROTO = {"default": 3, "resp2": 2, "resp3": 3}


@pytest.fixture(params=list(PROTOCOLS))
def proto(request):
    return request.param


@pytest.fixture
def r(port, proto):
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, **PROTOCOLS[proto])
    yield client
    client.close()


def test_connects_and_speaks_expected_protocol(r, proto):
    assert r.ping() is True
    hello = r.execute_command("HELLO")
    if isinstance(hello, list):  # RESP2: a flat list of field, value
        hello = dict(zip(hello[::2], hello[1::2]))
    proto_field = hello.get(b"proto", hello.get("proto"))
    assert proto_field == EXPECTED_PROTO[proto], hello


def test_incr_returns_exact_ints(r, prefix):
    key = prefix + "n"
    assert [r.incr(key) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert r.incrby(key, 10) == 15
    assert r.decr(key) == 14
    assert r.decrby(key, 4) == 10
    value = r.incr(key)
    assert type(value) is int and value == 11


def test_get_bytes_and_missing_none(r, prefix):
    assert r.set(prefix + "s", "hello") is True
    value = r.get(prefix + "s")
    assert type(value) is bytes and value == b"hello"
    r.incr(prefix + "n")
    r.incr(prefix + "n")
    assert r.get(prefix + "n") == b"2"
    assert r.get(prefix + "missing") is None


def test_hash_set_sorted_set_float_types(r, prefix):
    assert r.hset(prefix + "h", mapping={"a": "1", "b": "two"}) == 2
    h = r.hgetall(prefix + "h")
    assert type(h) is dict and h == {b"a": b"1", b"b": b"two"}
    assert r.hgetall(prefix + "missing-h") == {}
    assert r.hincrby(prefix + "h", "a", 41) == 42

    assert r.sadd(prefix + "set", "x", "y", "z") == 3
    s = r.smembers(prefix + "set")
    assert type(s) is set and s == {b"x", b"y", b"z"}
    assert r.sismember(prefix + "set", "y") in (True, 1)

    assert r.zadd(prefix + "z", {"m": 1.5, "n": 3}) == 2
    score = r.zscore(prefix + "z", "m")
    assert type(score) is float and score == 1.5
    assert r.zscore(prefix + "z", "absent") is None
    assert r.zincrby(prefix + "z", 2.25, "m") == 3.75
    # redis-py gives (member, score) tuples on RESP2 and [member, score] lists on RESP3.
    pairs = r.zrange(prefix + "z", 0, -1, withscores=True)
    assert [tuple(p) for p in pairs] == [(b"n", 3.0), (b"m", 3.75)]

    f = r.incrbyfloat(prefix + "f", 2.5)
    assert type(f) is float and f == 2.5
    assert r.incrbyfloat(prefix + "f", 0.25) == 2.75


def test_lists_and_key_commands(r, prefix):
    assert r.rpush(prefix + "l", "a", "b", "c") == 3
    assert r.lrange(prefix + "l", 0, -1) == [b"a", b"b", b"c"]
    assert r.lpop(prefix + "l") == b"a"
    assert r.expire(prefix + "l", 100) is True
    ttl = r.ttl(prefix + "l")
    assert type(ttl) is int and 0 < ttl <= 100
    assert r.ttl(prefix + "missing") == -2
    assert r.exists(prefix + "l", prefix + "missing") == 1
    assert r.delete(prefix + "l", prefix + "missing") == 1
    assert r.get(prefix + "l") is None


def test_mget_across_shards(r, prefix, stores):
    keys = [f"{prefix}k{i}" for i in range(32)]
    assert r.mset({k: f"v{i}" for i, k in enumerate(keys)}) is True
    got = r.mget(keys[:16] + [prefix + "missing"] + keys[16:])
    assert type(got) is list
    assert got == [f"v{i}".encode() for i in range(16)] + [None] + [
        f"v{i}".encode() for i in range(16, 32)
    ]
    # Each key is on exactly one store; behind a proxy with two shards, both hold some.
    held = [sum(1 for k in keys if s.exists(k)) for s in stores]
    assert sum(held) == len(keys), held
    assert all(n > 0 for n in held), held


def test_pipeline_1000_incrs_exact(r, prefix):
    pipe = r.pipeline(transaction=False)
    for _ in range(1000):
        pipe.incr(prefix + "p")
    results = pipe.execute()
    assert results == list(range(1, 1001))
    assert all(type(v) is int for v in results)
    assert r.get(prefix + "p") == b"1000"


def test_mixed_pipeline_types(r, prefix):
    pipe = r.pipeline(transaction=False)
    pipe.incr(prefix + "n").set(prefix + "s", "v").get(prefix + "s").get(prefix + "missing")
    pipe.hset(prefix + "h", "f", "1").hgetall(prefix + "h").sadd(prefix + "set", "a")
    pipe.smembers(prefix + "set").zadd(prefix + "z", {"m": 2}).zscore(prefix + "z", "m")
    assert pipe.execute() == [1, True, b"v", None, 1, {b"f": b"1"}, 1, {b"a"}, 1, 2.0]


def test_pool_shared_by_threads_exact_totals(port, proto, prefix, stores, flush):
    """8 threads x 500 INCRs over 50 keys through one pool: every key ends at exactly 80,
    in the replies, in a read, and (after a flush) on the store that owns it."""
    pool = redis.ConnectionPool(
        host=HOST, port=port, max_connections=8, socket_timeout=10, **PROTOCOLS[proto]
    )
    client = redis.Redis(connection_pool=pool)
    keys = [f"{prefix}t{i}" for i in range(50)]
    replies = [[] for _ in range(8)]
    errors = []

    def work(n):
        try:
            for i in range(500):
                replies[n].append(client.incr(keys[(n * 500 + i) % 50]))
        except Exception as e:  # reported below, not swallowed
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "threads did not finish in 60 s"
    assert errors == []
    assert all(len(rs) == 500 and all(type(v) is int for v in rs) for rs in replies)
    # Every key was incremented 80 times: its replies are exactly 1..80, each once.
    assert sorted(v for rs in replies for v in rs) == sorted(list(range(1, 81)) * 50)
    assert client.mget(keys) == [b"80"] * 50

    flush()
    landed = []
    for k in keys:
        values = [v for v in (s.get(k) for s in stores) if v is not None]
        landed.append(values)
    assert landed == [[b"80"]] * 50
    pool.disconnect()


def test_decode_responses(port, proto, prefix):
    r = redis.Redis(host=HOST, port=port, decode_responses=True, **PROTOCOLS[proto])
    try:
        assert r.incr(prefix + "n") == 1
        assert r.get(prefix + "n") == "1"
        r.set(prefix + "s", "héllo")
        assert r.get(prefix + "s") == "héllo"
        r.hset(prefix + "h", mapping={"a": "1"})
        assert r.hgetall(prefix + "h") == {"a": "1"}
        r.sadd(prefix + "set", "x", "y")
        assert r.smembers(prefix + "set") == {"x", "y"}
        r.zadd(prefix + "z", {"m": 0.5})
        assert r.zscore(prefix + "z", "m") == 0.5
        assert r.mget([prefix + "n", prefix + "missing", prefix + "s"]) == ["1", None, "héllo"]
    finally:
        r.close()


def test_asyncio_client(port, proto, prefix):
    async def main():
        # A blocking pool: 1,000 tasks wait for one of 16 connections instead of failing.
        pool = redis.asyncio.BlockingConnectionPool(
            host=HOST, port=port, max_connections=16, timeout=10, **PROTOCOLS[proto]
        )
        r = redis.asyncio.Redis(connection_pool=pool)
        try:
            assert await r.ping() is True
            keys = [f"{prefix}a{i}" for i in range(10)]
            # 1,000 INCRs in flight at once over the pool's connections.
            replies = await asyncio.gather(*(r.incr(keys[i % 10]) for i in range(1000)))
            assert all(type(v) is int for v in replies)
            assert sorted(replies) == sorted(list(range(1, 101)) * 10)
            assert await r.mget(keys) == [b"100"] * 10

            async with r.pipeline(transaction=False) as pipe:
                for _ in range(1000):
                    pipe.incr(prefix + "p")
                assert await pipe.execute() == list(range(1, 1001))

            await r.hset(prefix + "h", mapping={"f": "v"})
            assert await r.hgetall(prefix + "h") == {b"f": b"v"}
            await r.sadd(prefix + "s", "a", "b")
            assert await r.smembers(prefix + "s") == {b"a", b"b"}
            await r.zadd(prefix + "z", {"m": 4})
            assert await r.zscore(prefix + "z", "m") == 4.0
            assert await r.incrbyfloat(prefix + "f", 1.5) == 1.5
            assert await r.get(prefix + "missing") is None
        finally:
            await r.aclose()
            await pool.disconnect()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_scan_iter_and_keys_exact_key_sets(r, prefix, stores, flush):
    """scan_iter over every shard: each key of the run exactly once, counters incremented only
    through the proxy included; KEYS and the stores (read directly) agree."""
    # The test id's brackets ("[resp2]") would be a glob character class in MATCH.
    prefix = prefix.translate(str.maketrans("[]", "__"))
    strings = {f"{prefix}s{i}" for i in range(40)}
    counters = {f"{prefix}c{i}" for i in range(40)}
    assert r.mset({k: "v" for k in strings}) is True
    for k in counters:
        assert r.incrby(k, 3) == 3
    assert r.hset(prefix + "h", "f", "v") == 1
    want = strings | counters | {prefix + "h"}
    seen = list(r.scan_iter(match=prefix + "*", count=7))
    assert all(type(k) is bytes for k in seen)
    assert len(seen) == len(set(seen)), "a key returned twice"
    assert {k.decode() for k in seen} == want
    assert {k.decode() for k in r.scan_iter(match=prefix + "*", _type="hash")} == {prefix + "h"}
    assert {k.decode() for k in r.keys(prefix + "*")} == want
    flush()
    direct = set()
    for s in stores:
        direct |= {k.decode() for k in s.keys(prefix + "*")}
    assert direct == want
    assert all(not k.startswith(b"tally:") for k in r.scan_iter(count=50))
