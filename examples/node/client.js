#!/usr/bin/env node
// A Node client of both services with @grpc/grpc-js and @grpc/proto-loader, loading proto/ at run
// time (nothing generated). It allocates kv-cache and activations atomically in a scope, watches
// the events, renews the scope over KeepAlive, provokes a RESOURCE_EXHAUSTED and prints its
// RetryInfo, frees the scope, streams a Generate, cancels another, and prints an
// INVALID_ARGUMENT's BadRequest. Exits non-zero if any step does not behave as documented.
//
// Usage: node client.js MEMORY_ADDR RUNTIME_ADDR
//   (modules on NODE_PATH: @grpc/grpc-js, @grpc/proto-loader, google-proto-files)
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');

const PROTO = path.join(__dirname, '..', '..', 'proto');
const MIB = 1 << 20;
const SCOPE = 'node-example';

// Field names as in the proto (snake_case); 64-bit fields (sizes, epochs) as strings: a
// JavaScript number loses precision above 2^53.
const options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO] };
const api = grpc.loadPackageDefinition(
  protoLoader.loadSync(['memory/v1/memory.proto', 'runtime/v1/runtime.proto'], options),
);

// google.rpc.Status and its details, to decode the grpc-status-details-bin trailer.
const rpcRoot = protobuf.loadSync(
  ['google/rpc/status.proto', 'google/rpc/error_details.proto'].map((p) => path.join(googleProtoFiles.getProtoPath(), '..', p)),
);
const Status = rpcRoot.lookupType('google.rpc.Status');

function detail(err, typeName) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return null;
  const status = Status.decode(bin);
  const any = status.details.find((d) => (d.typeUrl || d.type_url || '').endsWith(`/google.rpc.${typeName}`));
  return any ? rpcRoot.lookupType(`google.rpc.${typeName}`).decode(any.value) : null;
}

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok  ${what}`);
}

const unary = (client, method, request) =>
  new Promise((resolve, reject) => client[method](request, (err, reply) => (err ? reject(err) : resolve(reply))));

// Reads a server stream to its end; resolves with its items, rejects with its status.
const collect = (call, onItem = () => {}) =>
  new Promise((resolve, reject) => {
    const items = [];
    call.on('data', (item) => { items.push(item); onItem(item); });
    call.on('error', reject);
    call.on('end', () => resolve(items));
  });

async function main(memoryAddr, runtimeAddr) {
  const memory = new api.memory.v1.MemoryService(memoryAddr, grpc.credentials.createInsecure());
  const runtime = new api.runtime.v1.RuntimeService(runtimeAddr, grpc.credentials.createInsecure());

  const seen = new Set();
  let watching = false;
  const events = memory.WatchEvents({});
  events.on('data', (item) => {
    watching = true;
    if (item.event && item.event.scope_id === SCOPE) seen.add(item.event.kind);
  });
  events.on('error', () => {}); // cancelled at the end
  // The stream is open once an event arrives: allocate and free a probe until one does (bounded),
  // so no event of the steps below can come before the watch is in place.
  for (let i = 0; i < 50 && !watching; i += 1) {
    const probe = await unary(memory, 'Allocate', { items: [{ pool: 'kv-cache', size_bytes: '1' }], holder: 'node-example' });
    await unary(memory, 'Free', { lease_id: probe.leases[0].lease_id });
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  check(watching, 'WatchEvents is streaming');

  const granted = await unary(memory, 'Allocate', {
    items: [{ pool: 'kv-cache', size_bytes: String(64 * MIB) }, { pool: 'activations', size_bytes: String(8 * MIB) }],
    holder: 'node-example',
    scope_id: SCOPE,
    ttl: { seconds: '30' },
  });
  check(granted.leases.length === 2, `Allocate granted ${granted.leases.length} leases atomically`);

  const keepAlive = memory.KeepAlive();
  const renewed = await new Promise((resolve, reject) => {
    keepAlive.on('data', resolve);
    keepAlive.on('error', reject);
    keepAlive.write({ scope_ids: [SCOPE] });
  });
  keepAlive.end();
  check(renewed.renewed_count === '2', `KeepAlive renewed ${renewed.renewed_count} leases of the scope`);

  // A pool of its own, filled: one more byte, without waiting, is RESOURCE_EXHAUSTED with a
  // retry hint (a pool others use could free room between two calls).
  await unary(memory, 'CreatePool', { name: 'node-example', capacity_bytes: String(MIB) });
  await unary(memory, 'Allocate', {
    items: [{ pool: 'node-example', size_bytes: String(MIB) }], holder: 'node-example', scope_id: SCOPE,
  });
  try {
    await unary(memory, 'Allocate', { items: [{ pool: 'node-example', size_bytes: '1' }], holder: 'node-example' });
    check(false, 'an Allocate beyond the available bytes is refused');
  } catch (err) {
    const retry = detail(err, 'RetryInfo');
    check(err.code === grpc.status.RESOURCE_EXHAUSTED && retry !== null,
      `RESOURCE_EXHAUSTED, retry in ${retry ? Number(retry.retryDelay.nanos) / 1e6 + Number(retry.retryDelay.seconds) * 1e3 : '?'} ms`);
  }

  const freed = await unary(memory, 'FreeScope', { scope_id: SCOPE });
  check(freed.freed_leases === '3', `FreeScope freed ${freed.freed_leases} leases`);

  const items = await collect(runtime.Generate({ model: 'distilgpt2', prompt: 'Tell me about memory', max_tokens: 12, seed: '7' }));
  const text = items.filter((i) => i.token).map((i) => i.token.text).join('');
  const summary = items.find((i) => i.summary);
  check(summary && summary.summary.completion_tokens === 12, `Generate streamed ${JSON.stringify(text)}`);

  const cancelled = runtime.Generate({ model: 'llama-3.1-8b', prompt: 'A long story', max_tokens: 1000, request_id: 'node-cancel' });
  let asked = false;
  try {
    await collect(cancelled, () => {
      if (!asked) {
        asked = true;
        unary(runtime, 'Cancel', { request_id: 'node-cancel' }).catch(() => {});
      }
    });
    check(false, 'a cancelled stream ends with CANCELLED');
  } catch (err) {
    check(err.code === grpc.status.CANCELLED, `Cancel ended the stream with code ${err.code}`);
  }

  try {
    await collect(runtime.Generate({ model: 'distilgpt2', prompt: 'hi', max_tokens: 0, temperature: 3, top_p: 2 }));
    check(false, 'a bad request is refused');
  } catch (err) {
    const bad = detail(err, 'BadRequest');
    const fields = bad ? bad.fieldViolations.map((v) => v.field) : [];
    check(err.code === grpc.status.INVALID_ARGUMENT && fields.join() === 'max_tokens,temperature,top_p',
      `INVALID_ARGUMENT with BadRequest violations ${fields}`);
  }

  events.cancel();
  const kinds = ['EVENT_KIND_ALLOCATED', 'EVENT_KIND_RENEWED', 'EVENT_KIND_FREED'];
  check(kinds.every((k) => seen.has(k)), `WatchEvents saw ${[...seen].sort()} for the scope`);
  memory.close();
  runtime.close();
  console.log('node client: all steps OK');
}

main(process.argv[2], process.argv[3]).catch((err) => {
  console.error(`FAILED: ${err.stack || err}`);
  process.exit(1);
});
