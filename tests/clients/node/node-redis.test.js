// node-redis (the `redis` package) against the server under test: createClient() with its
// defaults first (RESP3 from version 6 on: HELLO 3), then RESP: 2 and RESP: 3 spelt out.
// Exact values and the JavaScript types the library hands back. MULTI is not supported by
// tallyproxy: the pipeline is execAsPipeline(), which sends no MULTI.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { createClient } = require('redis');
const c = require('./common');

const VARIANTS = [
  { name: 'defaults', options: {}, proto: 3 },
  { name: 'RESP: 2', options: { RESP: 2 }, proto: 2 },
  { name: 'RESP: 3', options: { RESP: 3 }, proto: 3 },
];

for (const variant of VARIANTS) {
  describe(`node-redis ${variant.name}`, () => {
    const prefix = c.prefixFor(`node-redis-${variant.proto}-${variant.name.length}`);
    let client;
    let stores;

    before(async () => {
      client = createClient({
        socket: { host: c.host, port: c.port, connectTimeout: 5000, reconnectStrategy: false },
        ...variant.options,
      });
      client.on('error', () => {}); // a failed command rejects its own promise
      await client.connect();
      stores = c.openStores();
    });
    after(async () => {
      await client.close();
      stores.forEach((s) => s.disconnect());
    });

    it(`connects and speaks RESP${variant.proto}`, async () => {
      assert.equal(await client.ping(), 'PONG');
      const hello = c.helloFields(await client.sendCommand(['HELLO']));
      assert.equal(Number(hello.proto), variant.proto);
    });

    it('INCR family returns exact numbers', async () => {
      const key = prefix + 'n';
      const replies = [];
      for (let i = 0; i < 5; i++) replies.push(await client.incr(key));
      assert.deepEqual(replies, [1, 2, 3, 4, 5]);
      assert.equal(await client.incrBy(key, 10), 15);
      assert.equal(await client.decr(key), 14);
      assert.equal(await client.decrBy(key, 4), 10);
      const v = await client.incr(key);
      assert.equal(typeof v, 'number');
      assert.equal(v, 11);
    });

    it('scanIterator: every key of the run exactly once, across both shards', async () => {
      const want = [];
      for (let i = 0; i < 30; i++) want.push(`${prefix}scan:s${i}`, `${prefix}scan:c${i}`);
      for (let i = 0; i < 30; i++) {
        assert.equal(await client.set(`${prefix}scan:s${i}`, 'v'), 'OK');
        assert.equal(await client.incrBy(`${prefix}scan:c${i}`, 2), 2);
      }
      const seen = [];
      // node-redis 5 yields a batch (an array) per SCAN call; 4 yielded one key at a time.
      for await (const batch of client.scanIterator({ MATCH: `${prefix}scan:*`, COUNT: 7 })) {
        seen.push(...(Array.isArray(batch) ? batch : [batch]));
      }
      assert.equal(new Set(seen).size, seen.length, 'a key returned twice');
      assert.deepEqual([...seen].sort(), [...want].sort());
      assert.deepEqual([...(await client.keys(`${prefix}scan:*`))].sort(), [...want].sort());
      await c.flush();
      await c.assertSpread(stores, want);
    });

    it('GET returns a string, a missing key null', async () => {
      assert.equal(await client.set(prefix + 's', 'hello'), 'OK');
      assert.equal(await client.get(prefix + 's'), 'hello');
      await client.incr(prefix + 'g');
      await client.incr(prefix + 'g');
      assert.equal(await client.get(prefix + 'g'), '2');
      assert.equal(await client.get(prefix + 'missing'), null);
    });

    it('HGETALL object, SMEMBERS array, ZSCORE and INCRBYFLOAT numbers', async () => {
      assert.equal(await client.hSet(prefix + 'h', { a: '1', b: 'two' }), 2);
      const h = await client.hGetAll(prefix + 'h');
      assert.deepEqual({ ...h }, { a: '1', b: 'two' });
      assert.deepEqual({ ...(await client.hGetAll(prefix + 'missing-h')) }, {});
      assert.equal(await client.hIncrBy(prefix + 'h', 'a', 41), 42);

      assert.equal(await client.sAdd(prefix + 'set', ['x', 'y', 'z']), 3);
      const s = await client.sMembers(prefix + 'set');
      assert.ok(Array.isArray(s));
      assert.deepEqual([...s].sort(), ['x', 'y', 'z']);

      assert.equal(await client.zAdd(prefix + 'z', [{ score: 1.5, value: 'm' }, { score: 3, value: 'n' }]), 2);
      const score = await client.zScore(prefix + 'z', 'm');
      assert.equal(typeof score, 'number');
      assert.equal(score, 1.5);
      assert.equal(await client.zScore(prefix + 'z', 'absent'), null);
      assert.equal(Number(await client.zIncrBy(prefix + 'z', 2.25, 'm')), 3.75);
      assert.deepEqual(await client.zRangeWithScores(prefix + 'z', 0, -1), [
        { value: 'n', score: 3 },
        { value: 'm', score: 3.75 },
      ]);
      assert.equal(Number(await client.incrByFloat(prefix + 'f', 2.5)), 2.5);
      assert.equal(Number(await client.incrByFloat(prefix + 'f', 0.25)), 2.75);
    });

    it('lists and key commands', async () => {
      assert.equal(await client.rPush(prefix + 'l', ['a', 'b', 'c']), 3);
      assert.deepEqual(await client.lRange(prefix + 'l', 0, -1), ['a', 'b', 'c']);
      assert.equal(await client.lPop(prefix + 'l'), 'a');
      assert.equal(await client.expire(prefix + 'l', 100), 1);
      const ttl = await client.ttl(prefix + 'l');
      assert.ok(ttl > 0 && ttl <= 100, `ttl ${ttl}`);
      assert.equal(await client.ttl(prefix + 'missing'), -2);
      assert.equal(await client.exists([prefix + 'l', prefix + 'missing']), 1);
      assert.equal(await client.del([prefix + 'l', prefix + 'missing']), 1);
    });

    it('MGET across both shards, null for a missing key', async () => {
      const keys = Array.from({ length: 32 }, (_, i) => `${prefix}k${i}`);
      assert.equal(await client.mSet(keys.map((k, i) => [k, `v${i}`])), 'OK');
      const got = await client.mGet([...keys.slice(0, 16), prefix + 'missing', ...keys.slice(16)]);
      const want = keys.map((_, i) => `v${i}`);
      assert.deepEqual(got, [...want.slice(0, 16), null, ...want.slice(16)]);
      await c.assertSpread(stores, keys);
    });

    it('10,000 concurrent INCRs over 100 keys: exact totals', async () => {
      const keys = Array.from({ length: 100 }, (_, i) => `${prefix}c${i}`);
      // Issued in one tick: node-redis pipelines them on its one connection.
      const replies = await Promise.all(Array.from({ length: 10000 }, (_, i) => client.incr(keys[i % 100])));
      assert.ok(replies.every((v) => typeof v === 'number'));
      assert.deepEqual([...replies].sort((a, b) => a - b), c.expectedReplies(100, 100));
      assert.deepEqual(await client.mGet(keys), Array(100).fill('100'));
      await c.flush();
      assert.deepEqual(await c.landed(stores, keys), Array(100).fill(['100']));
    });

    it('execAsPipeline: 1,000 INCRs exact, mixed types', async () => {
      const pipe = client.multi();
      for (let i = 0; i < 1000; i++) pipe.incr(prefix + 'p');
      const replies = await pipe.execAsPipeline();
      assert.deepEqual(replies, Array.from({ length: 1000 }, (_, i) => i + 1));

      const mixed = await client
        .multi()
        .set(prefix + 'ps', 'v')
        .get(prefix + 'ps')
        .get(prefix + 'missing')
        .hSet(prefix + 'ph', 'f', '1')
        .zAdd(prefix + 'pz', { score: 2, value: 'm' })
        .zScore(prefix + 'pz', 'm')
        .execAsPipeline();
      assert.deepEqual(mixed, ['OK', 'v', null, 1, 1, 2]);
      assert.deepEqual({ ...(await client.hGetAll(prefix + 'ph')) }, { f: '1' });
    });
  });
}
