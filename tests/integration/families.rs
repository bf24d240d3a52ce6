//! The stream, geo, bitfield, SORT and function families through the proxy: byte for byte
//! what a Redis answers (RESP2 and RESP3); SORT patterns and cross-shard STORE refused;
//! FUNCTION LOAD on every shard so that FCALL finds it whichever shard its key leads to.

use crate::support::{self, ring_owner, Proxy, Redis, TempDir};

/// One function, so that FUNCTION LIST's order is defined.
const LIBRARY: &str = "#!lua name=lib\nredis.register_function{function_name='getk', callback=function(keys, args) return redis.call('GET', keys[1]) end, flags={'no-writes'}}";

const SCRIPT: &[&[&str]] = &[
    // streams (explicit ids: the same bytes from both)
    &["XADD", "{t}s", "1-1", "f", "v"],
    &["XADD", "{t}s", "2-1", "g", "w"],
    &["XLEN", "{t}s"],
    &["XRANGE", "{t}s", "-", "+"],
    &["XREVRANGE", "{t}s", "+", "-", "COUNT", "1"],
    &["XGROUP", "CREATE", "{t}s", "grp", "0"],
    &[
        "XREADGROUP",
        "GROUP",
        "grp",
        "c1",
        "COUNT",
        "1",
        "STREAMS",
        "{t}s",
        ">",
    ],
    &["XPENDING", "{t}s", "grp"],
    &["XACK", "{t}s", "grp", "1-1"],
    &["XINFO", "GROUPS", "{t}s"],
    &["XREAD", "STREAMS", "{t}s", "{t}s2", "0", "0"],
    &["XDEL", "{t}s", "2-1"],
    &["XTRIM", "{t}s", "MAXLEN", "0"],
    &["XSETID", "{t}s", "5-0"],
    // geo
    &[
        "GEOADD",
        "{t}g",
        "13.361389",
        "38.115556",
        "Palermo",
        "15.087269",
        "37.502669",
        "Catania",
    ],
    &["GEODIST", "{t}g", "Palermo", "Catania", "km"],
    &["GEOHASH", "{t}g", "Palermo"],
    &["GEOPOS", "{t}g", "Palermo", "Nowhere"],
    &[
        "GEOSEARCH",
        "{t}g",
        "FROMLONLAT",
        "15",
        "37",
        "BYRADIUS",
        "200",
        "km",
        "ASC",
    ],
    &[
        "GEOSEARCHSTORE",
        "{t}gs",
        "{t}g",
        "FROMLONLAT",
        "15",
        "37",
        "BYRADIUS",
        "200",
        "km",
    ],
    &[
        "GEORADIUS",
        "{t}g",
        "15",
        "37",
        "200",
        "km",
        "WITHDIST",
        "ASC",
    ],
    &[
        "GEORADIUS",
        "{t}g",
        "15",
        "37",
        "200",
        "km",
        "STORE",
        "{t}gr",
    ],
    &[
        "GEORADIUSBYMEMBER",
        "{t}g",
        "Palermo",
        "200",
        "km",
        "STOREDIST",
        "{t}gd",
    ],
    &["GEORADIUS_RO", "{t}g", "15", "37", "200", "km"],
    &["ZRANGE", "{t}gr", "0", "-1"],
    // bitfields
    &[
        "BITFIELD", "{t}b", "INCRBY", "i5", "100", "1", "GET", "u4", "0",
    ],
    &["BITFIELD_RO", "{t}b", "GET", "i5", "100"],
    // SORT without patterns, and with STORE on the same shard
    &["RPUSH", "{t}l", "3", "1", "2"],
    &["SORT", "{t}l"],
    &["SORT", "{t}l", "DESC", "LIMIT", "0", "2"],
    &["SORT_RO", "{t}l", "ALPHA"],
    &["SORT", "{t}l", "BY", "nosort", "GET", "#"],
    &["SORT", "{t}l", "STORE", "{t}sorted"],
    &["LRANGE", "{t}sorted", "0", "-1"],
    // functions
    &["FUNCTION", "LOAD", LIBRARY],
    &["SET", "{t}k", "v"],
    &["FCALL", "getk", "1", "{t}k"],
    &["FCALL_RO", "getk", "1", "{t}k"],
    &["FUNCTION", "LIST"],
    &["FUNCTION", "LOAD", LIBRARY],
    &["FUNCTION", "DELETE", "lib"],
    &["FCALL", "getk", "1", "{t}k"],
    &["FUNCTION", "FLUSH"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_geo_bitfield_sort_and_function_families_answer_as_redis() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("families");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    for hello in [None, Some("3")] {
        let (mut p, mut d) = support::raw_pair(proxy.addr, &direct, hello).await;
        support::assert_same_replies(&mut p, &mut d, SCRIPT, hello).await;
        for s in [&a, &b, &direct] {
            s.cmd(&["FLUSHALL"]);
        }
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_reach_every_shard_and_sort_patterns_are_refused() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("families-refused");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let shards = [&a, &b];
    let on = |port: u16| {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| ring_owner(&shards, k) == port)
            .unwrap()
    };
    let (on_a, on_b) = (on(a.port), on(b.port));
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["FUNCTION", "LOAD", LIBRARY]).await, "$3\r\nlib\r\n");
    for (key, shard) in [(&on_a, &a), (&on_b, &b)] {
        assert_eq!(c.cmd(&["SET", key, "here"]).await, "+OK\r\n");
        assert_eq!(c.cmd(&["FCALL", "getk", "1", key]).await, "$4\r\nhere\r\n");
        let libs = shard.cmd(&["FUNCTION", "LIST"]);
        assert!(
            format!("{libs:?}").contains("getk"),
            "loaded on {}",
            shard.port
        );
    }
    assert_eq!(
        c.cmd(&["FUNCTION", "STATS"]).await,
        "-ERR FUNCTION subcommands other than LOAD, DELETE, FLUSH, LIST and HELP are not supported by tallyproxy: they concern one server's state\r\n"
    );
    assert_eq!(
        c.cmd(&["SORT", &on_a, "BY", "weight_*"]).await,
        "-ERR SORT with BY or GET patterns naming other keys is not supported by tallyproxy: those keys may live on any shard\r\n"
    );
    assert_eq!(
        c.cmd(&["SORT", &on_a, "GET", "obj_*"]).await,
        "-ERR SORT with BY or GET patterns naming other keys is not supported by tallyproxy: those keys may live on any shard\r\n"
    );
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_eq!(c.cmd(&["SORT", &on_a, "STORE", &on_b]).await, crossslot);
    assert_eq!(
        c.cmd(&["GEORADIUS", &on_a, "15", "37", "200", "km", "STORE", &on_b])
            .await,
        crossslot
    );
    assert_eq!(
        c.cmd(&[
            "GEOSEARCHSTORE",
            &on_a,
            &on_b,
            "FROMLONLAT",
            "15",
            "37",
            "BYRADIUS",
            "1",
            "km"
        ])
        .await,
        crossslot
    );
    assert_eq!(c.cmd(&["FUNCTION", "FLUSH"]).await, "+OK\r\n");
    proxy.stop().await;
}
