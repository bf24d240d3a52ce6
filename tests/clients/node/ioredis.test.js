// ioredis against the server under test: its defaults first (protocol 3 from version 6 on:
// HELLO 3), then protocol 2, and protocol 3 with replyMapping "resp3" (maps and doubles as
// RESP3 gives them). Auto-pipelining on, as applications turn it on for throughput.
// ioredis's pipeline() sends no MULTI (MULTI is not supported by tallyproxy).
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const Redis = require('ioredis');
const c = require('./common');

const VARIANTS = [
  { name: 'defaults', options: {}, proto: 3, doubles: 'string' },
  { name: 'protocol 2', options: { protocol: 2 }, proto: 2, doubles: 'string' },
  {
    name: 'protocol 3, replyMapping resp3',
    options: { protocol: 3, replyMapping: 'resp3' },
    proto: 3,
    doubles: 'number',
  },
];

for (const variant of VARIANTS) {
  describe(`ioredis ${variant.name}`, () => {
    const prefix = c.prefixFor(`ioredis-${variant.proto}-${variant.name.length}`);
    let r;
    let stores;

    before(async () => {
      r = new Redis({
        host: c.host,
        port: c.port,
        enableAutoPipelining: true,
        connectTimeout: 5000,
        maxRetriesPerRequest: 1,
        retryStrategy: () => null,
        lazyConnect: true,
        ...variant.options,
      });
      r.on('error', () => {}); // a failed command rejects its own promise
      await r.connect();
      stores = c.openStores();
    });
    after(async () => {
      await r.quit();
      stores.forEach((s) => s.disconnect());
    });

    it(`connects and speaks RESP${variant.proto}`, async () => {
      assert.equal(await r.ping(), 'PONG');
      const hello = c.helloFields(await r.call('HELLO'));
      assert.equal(Number(hello.proto), variant.proto);
    });

    it('INCR family returns exact numbers', async () => {
      const key = prefix + 'n';
      const replies = [];
      for (let i = 0; i < 5; i++) replies.push(await r.incr(key));
      assert.deepEqual(replies, [1, 2, 3, 4, 5]);
      assert.equal(await r.incrby(key, 10), 15);
      assert.equal(await r.decr(key), 14);
      assert.equal(await r.decrby(key, 4), 10);
      const v = await r.incr(key);
      assert.equal(typeof v, 'number');
      assert.equal(v, 11);
    });

    it('scanStream: every key of the run exactly once, across both shards', async () => {
      const want = [];
      for (let i = 0; i < 30; i++) want.push(`${prefix}scan:s${i}`, `${prefix}scan:c${i}`);
      for (let i = 0; i < 30; i++) {
        assert.equal(await r.set(`${prefix}scan:s${i}`, 'v'), 'OK');
        assert.equal(await r.incrby(`${prefix}scan:c${i}`, 2), 2);
      }
      const seen = [];
      for await (const batch of r.scanStream({ match: `${prefix}scan:*`, count: 7 })) seen.push(...batch);
      assert.equal(new Set(seen).size, seen.length, 'a key returned twice');
      assert.deepEqual([...seen].sort(), [...want].sort());
      assert.deepEqual([...(await r.keys(`${prefix}scan:*`))].sort(), [...want].sort());
      await c.flush();
      await c.assertSpread(stores, want);
    });

    it('GET returns a string, a missing key null', async () => {
      assert.equal(await r.set(prefix + 's', 'hello'), 'OK');
      assert.equal(await r.get(prefix + 's'), 'hello');
      const buf = await r.getBuffer(prefix + 's');
      assert.ok(Buffer.isBuffer(buf));
      assert.equal(buf.toString(), 'hello');
      await r.incr(prefix + 'g');
      await r.incr(prefix + 'g');
      assert.equal(await r.get(prefix + 'g'), '2');
      assert.equal(await r.get(prefix + 'missing'), null);
    });

    it(`HGETALL object, SMEMBERS array, ZSCORE a ${variant.doubles}`, async () => {
      assert.equal(await r.hset(prefix + 'h', { a: '1', b: 'two' }), 2);
      const h = await r.hgetall(prefix + 'h');
      assert.deepEqual({ ...h }, { a: '1', b: 'two' });
      assert.deepEqual({ ...(await r.hgetall(prefix + 'missing-h')) }, {});
      assert.equal(await r.hincrby(prefix + 'h', 'a', 41), 42);

      assert.equal(await r.sadd(prefix + 'set', 'x', 'y', 'z'), 3);
      const s = await r.smembers(prefix + 'set');
      assert.ok(Array.isArray(s));
      assert.deepEqual([...s].sort(), ['x', 'y', 'z']);

      assert.equal(await r.zadd(prefix + 'z', 1.5, 'm', 3, 'n'), 2);
      const score = await r.zscore(prefix + 'z', 'm');
      assert.equal(typeof score, variant.doubles);
      assert.equal(Number(score), 1.5);
      assert.equal(await r.zscore(prefix + 'z', 'absent'), null);
      assert.equal(Number(await r.zincrby(prefix + 'z', 2.25, 'm')), 3.75);
      assert.equal(Number(await r.incrbyfloat(prefix + 'f', 2.5)), 2.5);
      assert.equal(Number(await r.incrbyfloat(prefix + 'f', 0.25)), 2.75);
    });

    it('lists and key commands', async () => {
      assert.equal(await r.rpush(prefix + 'l', 'a', 'b', 'c'), 3);
      assert.deepEqual(await r.lrange(prefix + 'l', 0, -1), ['a', 'b', 'c']);
      assert.equal(await r.lpop(prefix + 'l'), 'a');
      assert.equal(await r.expire(prefix + 'l', 100), 1);
      const ttl = await r.ttl(prefix + 'l');
      assert.ok(ttl > 0 && ttl <= 100, `ttl ${ttl}`);
      assert.equal(await r.ttl(prefix + 'missing'), -2);
      assert.equal(await r.exists(prefix + 'l', prefix + 'missing'), 1);
      assert.equal(await r.del(prefix + 'l', prefix + 'missing'), 1);
    });

    it('MGET across both shards, null for a missing key', async () => {
      const keys = Array.from({ length: 32 }, (_, i) => `${prefix}k${i}`);
      assert.equal(await r.mset(Object.fromEntries(keys.map((k, i) => [k, `v${i}`]))), 'OK');
      const got = await r.mget(...keys.slice(0, 16), prefix + 'missing', ...keys.slice(16));
      const want = keys.map((_, i) => `v${i}`);
      assert.deepEqual(got, [...want.slice(0, 16), null, ...want.slice(16)]);
      await c.assertSpread(stores, keys);
    });

    it('10,000 concurrent INCRs over 100 keys, auto-pipelined: exact totals', async () => {
      const keys = Array.from({ length: 100 }, (_, i) => `${prefix}c${i}`);
      const replies = await Promise.all(Array.from({ length: 10000 }, (_, i) => r.incr(keys[i % 100])));
      assert.ok(replies.every((v) => typeof v === 'number'));
      assert.deepEqual([...replies].sort((a, b) => a - b), c.expectedReplies(100, 100));
      assert.ok(r.autoPipelineQueueSize >= 0);
      assert.deepEqual(await r.mget(keys), Array(100).fill('100'));
      await c.flush();
      assert.deepEqual(await c.landed(stores, keys), Array(100).fill(['100']));
    });

    it('pipeline(): 1,000 INCRs exact, mixed types', async () => {
      const pipe = r.pipeline();
      for (let i = 0; i < 1000; i++) pipe.incr(prefix + 'p');
      const results = await pipe.exec();
      assert.deepEqual(results, Array.from({ length: 1000 }, (_, i) => [null, i + 1]));

      const mixed = await r
        .pipeline()
        .set(prefix + 'ps', 'v')
        .get(prefix + 'ps')
        .get(prefix + 'missing')
        .hset(prefix + 'ph', 'f', '1')
        .hgetall(prefix + 'ph')
        .sadd(prefix + 'pset', 'a')
        .smembers(prefix + 'pset')
        .exec();
      assert.deepEqual(
        mixed.map(([err, v]) => (err ? err.message : v)),
        ['OK', 'v', null, 1, { f: '1' }, 1, ['a']],
      );
    });
  });
}
