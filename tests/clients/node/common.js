// Where the Node.js suites connect, read from the environment that scripts/clients.sh sets
// (the same variables as the redis-py suite):
//   CLIENTS_PORT         the server under test (the proxy, or a plain redis-server); required
//   CLIENTS_HOST         its address (default 127.0.0.1)
//   CLIENTS_SHARD_PORTS  ports of the Redis servers behind it, read directly to check where
//                        values landed; unset: the server under test is the store
//   CLIENTS_HTTP_PORT    the proxy's sidecar, for POST /admin/flush; unset: nothing to flush
'use strict';

const crypto = require('node:crypto');
const assert = require('node:assert/strict');
const Redis = require('ioredis');

const host = process.env.CLIENTS_HOST || '127.0.0.1';
if (!process.env.CLIENTS_PORT) throw new Error('CLIENTS_PORT is not set (run scripts/clients.sh)');
const port = Number(process.env.CLIENTS_PORT);
const storePorts = (process.env.CLIENTS_SHARD_PORTS || String(port)).split(',').map(Number);
const httpPort = process.env.CLIENTS_HTTP_PORT;

// One prefix per file and run: no FLUSHALL through a proxy, and no {hash tag}, which would put
// every key on one shard.
function prefixFor(lib) {
  return `compat:${lib}:${crypto.randomBytes(4).toString('hex')}:`;
}

// Lands the proxy's pending increments on the shards (a no-op against plain Redis).
async function flush() {
  if (!httpPort) return;
  const res = await fetch(`http://${host}:${httpPort}/admin/flush`, {
    method: 'POST',
    signal: AbortSignal.timeout(10000),
  });
  assert.equal(res.status, 200);
}

// Direct RESP2 connections to where the values live (the shards, or the server itself).
function openStores() {
  return storePorts.map((p) => new Redis({ host, port: p, protocol: 2, lazyConnect: false }));
}

// Every key is on exactly one store; behind a proxy with two shards, both hold some.
async function assertSpread(stores, keys) {
  const held = await Promise.all(
    stores.map(async (s) => (await Promise.all(keys.map((k) => s.exists(k)))).reduce((a, b) => a + b, 0)),
  );
  assert.equal(held.reduce((a, b) => a + b, 0), keys.length, `held ${held}`);
  assert.ok(held.every((n) => n > 0), `held ${held}`);
}

// Each key's value as found on the stores: exactly one store must hold it.
async function landed(stores, keys) {
  return Promise.all(
    keys.map(async (k) => (await Promise.all(stores.map((s) => s.get(k)))).filter((v) => v !== null)),
  );
}

// 1..perKey, once for each of `keys` keys: what the replies of exact concurrent INCRs must be.
function expectedReplies(keys, perKey) {
  const out = [];
  for (let k = 0; k < keys; k++) for (let i = 1; i <= perKey; i++) out.push(i);
  return out.sort((a, b) => a - b);
}

// HELLO's reply as a plain object, whichever shape the library hands back.
function helloFields(reply) {
  if (reply instanceof Map) return Object.fromEntries(reply);
  if (Array.isArray(reply)) {
    const o = {};
    for (let i = 0; i < reply.length; i += 2) o[String(reply[i])] = reply[i + 1];
    return o;
  }
  return reply;
}

// A promise and the function that settles it, rejected if not settled within `ms`.
function deferred(ms, what) {
  let resolve;
  let timer;
  const promise = new Promise((res, rej) => {
    resolve = res;
    timer = setTimeout(() => rej(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return { promise: promise.finally(() => clearTimeout(timer)), resolve };
}

module.exports = {
  host, port, prefixFor, flush, openStores, assertSpread, landed, expectedReplies, helloFields,
  deferred,
};
