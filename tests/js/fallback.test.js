// Unit tests of NotifySocketManager's SSE fallback (static/notify/socket.js) and of its offline
// state (static/notify/persist.js), with a scripted WebSocket, EventSource and fetch.
// The real-server counterparts are in tests/test_js_fallback.py.
// Run: node --test tests/js/fallback.test.js   (pytest runs it from tests/test_js_client.py)
import assert from 'node:assert/strict'
import { after, describe, test } from 'node:test'

import { memoryStorage, TopicStore } from '../../static/notify/persist.js'
import { NotifySocketManager } from '../../static/notify/socket.js'

import { scriptedEventSource, scriptedWebSocket, waitFor } from './scripted.js'

const TOPIC = 'alerts.k8s'
const managers = []
after(() => managers.forEach((m) => m.close()))

/** A manager on scripted transports, with a quick fallback (retry of the socket after 20-40 ms). */
function manager(options = {}) {
  const WebSocket = scriptedWebSocket()
  const EventSource = scriptedEventSource()
  const m = new NotifySocketManager({
    url: 'http://notify.test',
    token: 'tok',
    backoff: { baseMs: 2, maxMs: 5 },
    reconnectOnOnline: false,
    fallback: { after: 2, retry: { baseMs: 40, maxMs: 40 } },
    WebSocket,
    EventSource,
    ...options,
  })
  managers.push(m)
  const log = { seqs: [], transports: [] }
  m.on('notification', (n) => log.seqs.push(n.seq))
  m.on('transport', (t) => log.transports.push(t.transport))
  return { m, WebSocket, EventSource, log }
}

/** Connect, have the socket fail `after` times before subscribing: the manager is on SSE. */
async function onSse(ctx) {
  const switched = waitFor(ctx.m, 'transport')
  ctx.m.connect(TOPIC)
  ;(await ctx.WebSocket.nth(1)).drop()
  ;(await ctx.WebSocket.nth(2)).drop()
  await switched
  return ctx.EventSource.nth(1)
}

describe('fallback to SSE', () => {
  test('two sockets failing before subscribed switch the topic to SSE at the last seq', async () => {
    const ctx = manager()
    const { m, WebSocket, log } = ctx
    m.connect(TOPIC)
    const first = await WebSocket.nth(1)
    first.open()
    first.subscribed(0)
    first.notify(1)
    first.drop() // after subscribed: an ordinary drop, not counted
    ;(await WebSocket.nth(2)).drop()
    assert.equal(m.transport(TOPIC), 'websocket')
    const switched = waitFor(m, 'transport')
    ;(await WebSocket.nth(3)).drop()
    assert.deepEqual(await switched, { transport: 'sse', previous: 'websocket', reason: '2 WebSockets failed before subscribing' })
    const es = await ctx.EventSource.nth(1)
    assert.equal(es.url.pathname, '/events/alerts.k8s/')
    assert.deepEqual(Object.fromEntries(es.url.searchParams), { unnamed: '1', token: 'tok', lastEventId: '1' })
    es.open()
    es.subscribed(3)
    es.notify(1, 'message') // overlap: already delivered by the socket
    es.notify(2, 'message')
    es.notify(3, 'message')
    assert.deepEqual(log.seqs, [1, 2, 3])
    assert.equal(m.state(TOPIC), 'open')
  })

  test('a socket that never opens switches to SSE after openTimeoutMs', async () => {
    const ctx = manager({ fallback: { openTimeoutMs: 20, retry: { baseMs: 10_000, maxMs: 10_000 } } })
    const switched = waitFor(ctx.m, 'transport')
    ctx.m.connect(TOPIC)
    const ws = await ctx.WebSocket.nth(1) // never opened by the "server"
    assert.equal((await switched).transport, 'sse')
    assert.equal(ws.onopen, null) // detached: a late open cannot come back to life
    await ctx.EventSource.nth(1)
  })

  test('server close codes are not a proxy refusing upgrades: no fallback', async () => {
    const ctx = manager()
    ctx.m.connect(TOPIC)
    for (const n of [1, 2, 3]) {
      const ws = await ctx.WebSocket.nth(n)
      ws.open()
      ws.onclose({ code: 1013, reason: 'try later' })
    }
    await ctx.WebSocket.nth(4)
    assert.equal(ctx.m.transport(TOPIC), 'websocket')
    assert.equal(ctx.EventSource.instances.length, 0)
  })

  test('back to the socket once one is live: replay overlap dropped, SSE closed, no gap', async () => {
    const ctx = manager()
    const { m, WebSocket, log } = ctx
    const es = await onSse(ctx)
    es.open()
    es.subscribed(0)
    es.notify(1, 'message')
    es.notify(2, 'message')
    const probe = await WebSocket.nth(3) // the retry, from the last seq
    assert.equal(probe.url.searchParams.get('since'), '2')
    probe.open()
    assert.equal(m.transport(TOPIC), 'sse') // open is not enough: live means subscribed
    es.notify(3, 'message') // SSE still delivers during the socket's replay
    probe.notify(3) // the replay overlaps: dropped
    probe.notify(4)
    es.notify(4, 'message')
    const back = waitFor(m, 'transport')
    probe.subscribed(4)
    assert.deepEqual(await back, { transport: 'websocket', previous: 'sse', reason: 'WebSocket works again' })
    assert.equal(es.readyState, 2) // closed
    es.notify(5, 'message') // a late event of the closed stream is not delivered
    probe.notify(5)
    assert.deepEqual(log.seqs, [1, 2, 3, 4, 5])
    assert.deepEqual(log.transports, ['sse', 'websocket'])
  })

  test('while on SSE a refused retry keeps the stream and tries again later', async () => {
    const ctx = manager()
    const es = await onSse(ctx)
    es.open()
    es.subscribed(0)
    ;(await ctx.WebSocket.nth(3)).drop()
    ;(await ctx.WebSocket.nth(4)).drop()
    await ctx.WebSocket.nth(5)
    assert.equal(ctx.m.transport(TOPIC), 'sse')
    assert.equal(ctx.EventSource.instances.length, 1)
    assert.equal(es.readyState, 1)
    es.notify(1, 'message')
    assert.deepEqual(ctx.log.seqs, [1])
  })

  test('no fallback without an EventSource implementation, nor with fallback: false', async () => {
    for (const options of [{ EventSource: undefined }, { fallback: false }]) {
      const ctx = manager(options)
      ctx.m.connect(TOPIC)
      for (const n of [1, 2, 3]) (await ctx.WebSocket.nth(n)).drop()
      await ctx.WebSocket.nth(4)
      assert.equal(ctx.m.transport(TOPIC), 'websocket')
    }
  })

  test('bad fallback options are refused with a message', () => {
    assert.throws(() => new NotifySocketManager({ url: 'http://x', fallback: { after: 0 } }), /fallback.after must be a positive integer/)
    assert.throws(() => new NotifySocketManager({ url: 'http://x', fallback: 'sse' }), /fallback must be true, false or/)
  })
})

/** A fetch that records requests and answers with `answer(request)` ({status, body, headers}). */
function scriptedFetch(answer) {
  const requests = []
  const fetch = async (url, init) => {
    const request = { url, ...init, json: JSON.parse(init.body) }
    requests.push(request)
    const { status, body, headers = {} } = answer(request)
    return { status, headers: new Map(Object.entries(headers)), json: async () => body }
  }
  return { fetch, requests }
}

describe('publishing while on SSE', () => {
  test('goes over HTTP with the client token and resolves with the ack', async () => {
    const { fetch, requests } = scriptedFetch((r) => ({ status: 202, body: { type: 'ack', seq: 7, id: 'n-7', ref: r.json.ref } }))
    const ctx = manager({ fetch })
    await onSse(ctx)
    const ack = await ctx.m.publish(TOPIC, 'deploy.start', { v: 2 }, { severity: 'warning' })
    assert.equal(ack.seq, 7)
    const [request] = requests
    assert.equal(request.url, 'http://notify.test/api/v1/topics/alerts.k8s/publish')
    assert.equal(request.method, 'POST')
    assert.equal(request.headers.Authorization, 'Bearer tok')
    assert.deepEqual(request.json, { event: 'deploy.start', data: { v: 2 }, ref: ack.ref, severity: 'warning' })
  })

  test('a refusal rejects with the status, a code and the server detail', async () => {
    const { fetch } = scriptedFetch(() => ({
      status: 429,
      body: { detail: 'at most 50/s publishes per user: slow down', errors: [] },
      headers: { 'Retry-After': '1' },
    }))
    const ctx = manager({ fetch })
    await onSse(ctx)
    await assert.rejects(ctx.m.publish(TOPIC, 'x', {}), (err) => {
      assert.equal(err.message, 'at most 50/s publishes per user: slow down')
      assert.equal(err.status, 429)
      assert.equal(err.code, 'rate_limited')
      assert.equal(err.retryAfterS, 1)
      return true
    })
  })

  test('a network failure leaves the outcome unknown; without a token nothing is sent', async () => {
    const failing = async () => {
      throw new Error('connection reset')
    }
    const ctx = manager({ fetch: failing })
    await onSse(ctx)
    await assert.rejects(ctx.m.publish(TOPIC, 'x', {}), (err) => err.outcomeUnknown === true)

    const { fetch, requests } = scriptedFetch(() => ({ status: 202, body: {} }))
    const anonymous = manager({ fetch, token: null })
    await onSse(anonymous)
    await assert.rejects(anonymous.m.publish(TOPIC, 'x', {}), /needs a client token/)
    assert.equal(requests.length, 0)
  })

  test('publishes queued for the socket when it fell back go over HTTP, in order', async () => {
    const { fetch, requests } = scriptedFetch((r) => ({ status: 202, body: { type: 'ack', seq: r.json.data.n, id: 'x', ref: r.json.ref } }))
    const ctx = manager({ fetch })
    ctx.m.connect(TOPIC)
    const acks = [ctx.m.publish(TOPIC, 'e', { n: 1 }), ctx.m.publish(TOPIC, 'e', { n: 2 })]
    ;(await ctx.WebSocket.nth(1)).drop()
    ;(await ctx.WebSocket.nth(2)).drop()
    assert.deepEqual((await Promise.all(acks)).map((a) => a.seq), [1, 2])
    assert.deepEqual(requests.map((r) => r.json.data.n), [1, 2])
  })
})

/** An adapter over a Map whose methods can be made to fail. */
function faultyStorage(values = new Map()) {
  return {
    values,
    failSet: null,
    get: (key) => values.get(key) ?? null,
    set(key, value) {
      if (this.failSet) throw this.failSet
      values.set(key, value)
    },
    remove: (key) => values.delete(key),
  }
}

const stored = (seqs, lastSeq = seqs.at(-1)) =>
  JSON.stringify({ v: 1, lastSeq, notifications: seqs.map((seq) => ({ type: 'notification', topic: TOPIC, seq })) })

describe('offline state (persist)', () => {
  test('restored notifications are there during connect, flagged cached, and the socket resumes after them', async () => {
    const storage = faultyStorage(new Map([[`notify:${TOPIC}`, stored([4, 5])]]))
    const ctx = manager({ persist: storage, fallback: false })
    const seen = []
    ctx.m.on('cached', (state) => seen.push(state))
    ctx.m.connect(TOPIC)
    assert.deepEqual(seen.map((s) => [s.lastSeq, s.notifications.map((n) => [n.seq, n.cached])]), [
      [5, [[4, true], [5, true]]],
    ])
    assert.deepEqual(ctx.m.cached(TOPIC).map((n) => n.seq), [4, 5])
    const ws = await ctx.WebSocket.nth(1)
    assert.equal(ws.url.searchParams.get('since'), '5')
    ws.open()
    ws.notify(5) // overlap
    ws.notify(6)
    assert.deepEqual(ctx.log.seqs, [6])
    await Promise.resolve() // the write waits for the end of the task
    const record = JSON.parse(storage.values.get(`notify:${TOPIC}`))
    assert.deepEqual([record.lastSeq, record.notifications.map((n) => n.seq)], [6, [4, 5, 6]])
  })

  test('an async storage is awaited before the first socket, so it resumes after the stored seq', async () => {
    let release
    const slow = {
      get: () => new Promise((resolve) => (release = () => resolve(stored([9])))),
      set: async () => {},
      remove: async () => {},
    }
    const ctx = manager({ persist: slow, fallback: false })
    const cached = waitFor(ctx.m, 'cached')
    ctx.m.connect(TOPIC)
    await new Promise((resolve) => setTimeout(resolve, 10))
    assert.equal(ctx.WebSocket.instances.length, 0)
    release()
    assert.deepEqual((await cached).lastSeq, 9)
    assert.equal((await ctx.WebSocket.nth(1)).url.searchParams.get('since'), '9')
  })

  test('keeps at most persistLimit notifications', async () => {
    for (const [limit, kept] of [
      [2, [2, 3]],
      [1, [3]],
    ]) {
      const storage = faultyStorage()
      const ctx = manager({ persist: storage, persistLimit: limit, fallback: false })
      ctx.m.connect(TOPIC)
      const ws = await ctx.WebSocket.nth(1)
      ws.open()
      for (const seq of [1, 2, 3]) ws.notify(seq)
      await Promise.resolve()
      assert.deepEqual(JSON.parse(storage.values.get(`notify:${TOPIC}`)).notifications.map((n) => n.seq), kept)
      assert.deepEqual(ctx.m.topics.get(TOPIC).recent.map((n) => n.seq), kept)
    }
  })

  test('a failing storage (quota) warns once and the client goes on in memory', async () => {
    const warnings = []
    const storage = faultyStorage()
    storage.failSet = new Error('QuotaExceededError')
    const store = new TopicStore(storage, { warn: (w) => warnings.push(w) })
    store.save(TOPIC, { lastSeq: 1, notifications: [{ seq: 1 }] })
    await Promise.resolve()
    store.save(TOPIC, { lastSeq: 2, notifications: [{ seq: 2 }] })
    await Promise.resolve()
    assert.equal(warnings.length, 1)
    assert.match(warnings[0], /QuotaExceededError.*in memory only/)
    assert.deepEqual(store.load(TOPIC), { lastSeq: 2, notifications: [{ seq: 2 }] })
  })

  test('a disabled storage (reading it throws) and a rejecting async one are survived', async () => {
    const warnings = []
    const disabled = {
      get: () => {
        throw new Error('SecurityError: storage is disabled')
      },
      set: () => {},
      remove: () => {},
    }
    const store = new TopicStore(disabled, { warn: (w) => warnings.push(w) })
    assert.equal(store.load(TOPIC), null)
    const rejecting = { get: async () => Promise.reject(new Error('idb closed')), set: async () => {}, remove: async () => {} }
    const asyncStore = new TopicStore(rejecting, { warn: (w) => warnings.push(w) })
    assert.equal(await asyncStore.load(TOPIC), null)
    assert.equal(warnings.length, 2) // one per store
  })

  test('corrupt or foreign values are ignored with one warning', () => {
    const warnings = []
    const storage = memoryStorage()
    const store = new TopicStore(storage, { warn: (w) => warnings.push(w) })
    for (const text of ['{not json', '{"v": 99}', '[1,2]', JSON.stringify({ v: 1, lastSeq: 'x', notifications: [] })]) {
      storage.set(`notify:${TOPIC}`, text)
      assert.equal(store.load(TOPIC), null)
    }
    assert.equal(warnings.length, 1)
    assert.match(warnings[0], /not readable; it is ignored/)
  })

  test('bad persist options are refused with a message', () => {
    assert.throws(() => new TopicStore({ get() {} }), /storage adapter with get\(key\), set\(key, value\) and remove\(key\)/)
    assert.throws(() => new TopicStore(memoryStorage(), { limit: 0 }), /persistLimit must be a positive integer/)
  })
})
