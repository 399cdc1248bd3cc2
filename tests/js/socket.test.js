// Unit tests of static/notify/socket.js against a scripted `ws` server on 127.0.0.1.
// Run: node --test tests/js/socket.test.js   (pytest runs it from tests/test_js_client.py)
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer } from 'node:net'
import { after, describe, test } from 'node:test'

import { WebSocket, WebSocketServer } from 'ws'

import { backoffDelay, NotifySocketManager } from '../../static/notify/socket.js'

import { waitFor } from './scripted.js'

const FAST = { backoff: { baseMs: 5, maxMs: 20 }, reconnectOnOnline: false, WebSocket }
const managers = []

function manager(options = {}) {
  const m = new NotifySocketManager({ ...FAST, ...options })
  managers.push(m)
  return m
}

after(() => managers.forEach((m) => m.close()))

/** A free TCP port on 127.0.0.1 (nothing listens on it once this resolves). */
async function freePort() {
  const srv = createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const { port } = srv.address()
  srv.close()
  await once(srv, 'close')
  return port
}

/**
 * A scripted server: records every connection (URL and frames received) and hands each new
 * connection to `onConnection(socket, url, index)`.
 */
async function scriptedServer(onConnection = () => {}, port = 0) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port })
  await once(wss, 'listening')
  const connections = []
  const waiters = []
  wss.on('connection', (socket, req) => {
    const url = new URL(req.url, 'http://x')
    const record = { socket, url, frames: [], closed: null }
    connections.push(record)
    socket.on('message', (data) => {
      record.frames.push(JSON.parse(data.toString()))
      wake()
    })
    socket.on('close', (code) => {
      record.closed = code
      wake()
    })
    onConnection(socket, url, connections.length - 1)
    wake()
  })
  function wake() {
    for (const w of [...waiters]) if (w.check()) waiters.splice(waiters.indexOf(w), 1)
  }
  /** Wait until `predicate(connections)` holds (5 s limit). */
  function until(predicate) {
    return new Promise((resolve, reject) => {
      const w = {
        check: () => {
          if (!predicate(connections)) return false
          clearTimeout(timer)
          resolve(connections)
          return true
        },
      }
      const timer = setTimeout(() => {
        waiters.splice(waiters.indexOf(w), 1)
        reject(new Error('timed out waiting for the server condition'))
      }, 5000)
      if (!w.check()) waiters.push(w)
    })
  }
  after(() => wss.close())
  return { wss, url: `ws://127.0.0.1:${wss.address().port}`, connections, until }
}

const note = (topic, seq) => JSON.stringify({ type: 'notification', topic, seq, event: 'e', data: { seq } })

describe('backoffDelay', () => {
  test('stays in [0, min(cap, base * 2^attempt)) with full jitter', () => {
    const opts = { baseMs: 500, maxMs: 30_000 }
    for (let attempt = 0; attempt < 60; attempt += 1) {
      const ceiling = Math.min(30_000, 500 * 2 ** attempt)
      assert.equal(backoffDelay(attempt, opts, () => 0), 0)
      const top = backoffDelay(attempt, opts, () => 0.999999)
      assert.ok(top < ceiling && top >= ceiling * 0.99, `attempt ${attempt}: ${top} vs ${ceiling}`)
      for (let i = 0; i < 50; i += 1) {
        const d = backoffDelay(attempt, opts)
        assert.ok(d >= 0 && d < ceiling)
      }
    }
  })

  test('is capped at 30 s by default, even after thousands of attempts', () => {
    assert.equal(backoffDelay(5000, {}, () => 0.999999), 29_999)
    assert.equal(backoffDelay(0, {}, () => 0.999999), 499)
  })
})

describe('NotifySocketManager', () => {
  test('queued frames are flushed in order when the server comes up', async () => {
    const port = await freePort()
    const m = manager({ url: `ws://127.0.0.1:${port}` })
    m.connect('alerts.k8s')
    for (let i = 1; i <= 5; i += 1) assert.equal(m.send('alerts.k8s', { type: 'publish', event: 'e', data: { i } }), true)
    await waitFor(m, 'reconnect') // the first attempt failed: nothing listens yet
    const server = await scriptedServer(() => {}, port)
    await server.until((c) => c.length === 1 && c[0].frames.length >= 5)
    assert.deepEqual(server.connections[0].frames.slice(0, 5).map((f) => f.data.i), [1, 2, 3, 4, 5])
    m.send('alerts.k8s', { type: 'publish', event: 'e', data: { i: 6 } })
    await server.until((c) => c[0].frames.some((f) => f.data?.i === 6))
    assert.equal(m.queued('alerts.k8s'), 0)
  })

  test('a full queue drops the oldest frame and says so', async () => {
    const port = await freePort()
    const m = manager({ url: `ws://127.0.0.1:${port}`, queueLimit: 2 })
    const dropped = []
    m.on('dropped', (d) => dropped.push(d))
    m.connect('t.q')
    for (const i of [1, 2, 3]) m.send('t.q', { type: 'publish', event: 'e', data: { i } })
    assert.deepEqual(dropped.map((d) => [d.frame.data.i, d.reason]), [[1, 'queue full']])
    const server = await scriptedServer(() => {}, port)
    await server.until((c) => c.length === 1 && c[0].frames.length >= 2)
    assert.deepEqual(server.connections[0].frames.map((f) => f.data.i), [2, 3])
  })

  test("the 'reject' overflow policy refuses the new frame", async () => {
    const port = await freePort()
    const m = manager({ url: `ws://127.0.0.1:${port}`, queueLimit: 1, queueOverflow: 'reject' })
    m.connect('t.r')
    assert.equal(m.send('t.r', { type: 'x', n: 1 }), true)
    assert.equal(m.send('t.r', { type: 'x', n: 2 }), false)
    assert.equal(m.queued('t.r'), 1)
  })

  test('reconnect resumes after the last seq and drops replayed duplicates', async () => {
    const server = await scriptedServer((socket, url, index) => {
      if (index === 0) {
        socket.send(JSON.stringify({ type: 'subscribed', topic: 't.a', last_seq: 0 }))
        for (const seq of [1, 2, 3]) socket.send(note('t.a', seq))
        socket.close(1001, 'restart')
      } else {
        // Replay overlapping what the client already has, then live.
        for (const seq of [2, 3, 4]) socket.send(note('t.a', seq))
        socket.send(JSON.stringify({ type: 'subscribed', topic: 't.a', last_seq: 4 }))
        socket.send(note('t.a', 5))
      }
    })
    const m = manager({ url: server.url })
    const seen = []
    m.on('notification', (n, topic) => seen.push([topic, n.seq]))
    const done = waitFor(m, 'notification', (n) => n.seq === 5)
    m.connect('t.a')
    await done
    assert.deepEqual(seen, [1, 2, 3, 4, 5].map((s) => ['t.a', s]))
    assert.equal(server.connections[0].url.searchParams.get('since'), null)
    assert.equal(server.connections[1].url.searchParams.get('since'), '3')
    assert.equal(m.lastSeq('t.a'), 5)
  })

  test('a live-only subscription resumes from the last_seq the server announced', async () => {
    const server = await scriptedServer((socket, url, index) => {
      if (index === 0) {
        socket.send(JSON.stringify({ type: 'subscribed', topic: 't.l', last_seq: 41 }))
        socket.close(1001)
      }
    })
    const m = manager({ url: server.url })
    m.connect('t.l')
    await server.until((c) => c.length === 2)
    assert.equal(server.connections[1].url.searchParams.get('since'), '41')
  })

  test('reset frames are surfaced and the stream goes on after last_seq', async () => {
    const server = await scriptedServer((socket, url, index) => {
      if (index === 0) {
        socket.send(JSON.stringify({ type: 'reset', topic: 't.r', since: 2, oldest_seq: 50, last_seq: 60 }))
        socket.send(JSON.stringify({ type: 'subscribed', topic: 't.r', last_seq: 60 }))
        socket.send(note('t.r', 61))
        socket.close(1001)
      }
    })
    const m = manager({ url: server.url })
    const gaps = []
    m.on('gap', (g) => gaps.push(g))
    const reset = waitFor(m, 'reset')
    const n = waitFor(m, 'notification')
    m.connect('t.r', { since: 2 })
    assert.deepEqual(await reset, { type: 'reset', topic: 't.r', since: 2, oldest_seq: 50, last_seq: 60 })
    assert.equal((await n).seq, 61)
    assert.deepEqual(gaps, [])
    await server.until((c) => c.length === 2)
    assert.equal(server.connections[0].url.searchParams.get('since'), '2')
    assert.equal(server.connections[1].url.searchParams.get('since'), '61')
  })

  test('4403 stops the topic and reports it; nothing reconnects', async () => {
    const server = await scriptedServer((socket) => socket.close(4403, 'topic not allowed'))
    const m = manager({ url: server.url })
    const error = waitFor(m, 'error', (e) => e.fatal)
    const closed = waitFor(m, 'close')
    m.connect('system.secret')
    assert.deepEqual(await error, { code: 4403, message: 'topic not allowed', fatal: true })
    assert.equal((await closed).willReconnect, false)
    assert.equal(m.state('system.secret'), 'stopped')
    assert.equal(server.connections.length, 1)
  })

  test('4401 fetches a fresh token from the provider and retries', async () => {
    const tokens = ['expired', 'fresh']
    const server = await scriptedServer((socket, url) => {
      if (url.searchParams.get('token') === 'expired') socket.close(4401, 'token has expired')
      else socket.send(JSON.stringify({ type: 'subscribed', topic: 't.tok', last_seq: 0 }))
    })
    const m = manager({ url: server.url, token: async () => tokens.shift() })
    const subscribed = waitFor(m, 'subscribed')
    m.connect('t.tok')
    await subscribed
    assert.deepEqual(server.connections.map((c) => c.url.searchParams.get('token')), ['expired', 'fresh'])
  })

  test('4401 with a fixed token stops instead of retrying the same token', async () => {
    const server = await scriptedServer((socket) => socket.close(4401, 'token has expired'))
    const m = manager({ url: server.url, token: 'old' })
    const error = waitFor(m, 'error', (e) => e.fatal)
    m.connect('t.fixed')
    assert.equal((await error).code, 4401)
    assert.equal(m.state('t.fixed'), 'stopped')
  })

  test('a server that stops answering pings is dropped and reconnected', async () => {
    // The first connection never says anything; the second one answers pings.
    const server = await scriptedServer((socket, url, index) => {
      if (index > 0) {
        socket.on('message', (d) => {
          if (JSON.parse(d.toString()).type === 'ping') socket.send('{"type":"pong"}')
        })
      }
    })
    const m = manager({ url: server.url, heartbeatIntervalMs: 20, heartbeatTimeoutMs: 40 })
    const closed = waitFor(m, 'close')
    m.connect('t.hb')
    assert.equal((await closed).code, 4000)
    await server.until((c) => c.length === 2 && c[1].frames.filter((f) => f.type === 'ping').length >= 3)
    assert.ok(server.connections[0].frames.every((f) => f.type === 'ping'))
    assert.equal(server.connections.length, 2)
  })

  test('server pings are answered with pong', async () => {
    const server = await scriptedServer((socket) => socket.send('{"type":"ping"}'))
    const m = manager({ url: server.url })
    m.connect('t.p')
    await server.until((c) => c.length === 1 && c[0].frames.some((f) => f.type === 'pong'))
  })

  test('publish resolves with the ack for its ref', async () => {
    const server = await scriptedServer((socket) => {
      socket.on('message', (d) => {
        const f = JSON.parse(d.toString())
        if (f.type === 'publish') socket.send(JSON.stringify({ type: 'ack', ref: f.ref, seq: 7, id: 'u-7' }))
      })
    })
    const m = manager({ url: server.url })
    m.connect('t.pub')
    const ack = await m.publish('t.pub', 'user.click', { x: 1 }, { severity: 'info' })
    assert.equal(ack.seq, 7)
    assert.deepEqual(server.connections[0].frames[0], { type: 'publish', event: 'user.click', data: { x: 1 }, ref: ack.ref, severity: 'info' })
  })

  test('publish rejects with the server error for its ref', async () => {
    const server = await scriptedServer((socket) => {
      socket.on('message', (d) => {
        const f = JSON.parse(d.toString())
        socket.send(JSON.stringify({ type: 'error', code: 'forbidden', message: 'you may not publish', ref: f.ref }))
      })
    })
    const m = manager({ url: server.url })
    m.connect('t.no')
    await assert.rejects(m.publish('t.no', 'e', {}), (err) => err.code === 'forbidden')
  })

  test('off() and the returned unsubscribe stop delivery', async () => {
    const server = await scriptedServer((socket) => {
      socket.on('message', () => socket.send(note('t.off', 1 + server.connections[0].frames.length)))
    })
    const m = manager({ url: server.url })
    const a = []
    const b = []
    const handlerA = (n) => a.push(n.seq)
    m.on('notification', handlerA)
    const offB = m.on('notification', (n) => b.push(n.seq))
    m.connect('t.off')
    const first = waitFor(m, 'notification', (n) => n.seq === 2)
    m.send('t.off', { type: 'nudge' })
    await first
    m.off('notification', handlerA)
    offB()
    const probe = waitFor(m, 'notification', (n) => n.seq === 3)
    m.send('t.off', { type: 'nudge' })
    await probe
    assert.deepEqual([a, b], [[2], [2]])
  })

  test('disconnect() closes with 1000 and never reconnects', async () => {
    const server = await scriptedServer((socket) =>
      socket.send(JSON.stringify({ type: 'subscribed', topic: 't.d', last_seq: 0 })),
    )
    const m = manager({ url: server.url })
    const subscribed = waitFor(m, 'subscribed')
    m.connect('t.d')
    await subscribed
    const states = []
    m.on('state', (s) => states.push(s.state))
    m.disconnect('t.d')
    await server.until((c) => c[0].closed !== null)
    assert.equal(server.connections[0].closed, 1000)
    assert.deepEqual(states, ['closed'])
    assert.equal(m.state('t.d'), 'closed')
  })

  test('one socket per topic, each with its own attempt counter', async () => {
    const server = await scriptedServer((socket, url) => {
      if (url.pathname === '/ws/bad.one/') socket.close(1011)
      else socket.send(JSON.stringify({ type: 'subscribed', topic: 'good', last_seq: 0 }))
    })
    const m = manager({ url: server.url })
    const reconnects = []
    m.on('reconnect', (r, topic) => reconnects.push([topic, r.attempt]))
    const good = waitFor(m, 'subscribed')
    m.connect('good.one')
    m.connect('good.one') // idempotent
    m.connect('bad.one')
    await good
    await waitFor(m, 'reconnect', (r) => r.attempt === 3)
    assert.ok(reconnects.every(([topic]) => topic === 'bad.one'))
    assert.deepEqual(reconnects.map(([, n]) => n).slice(0, 3), [1, 2, 3])
    assert.equal(server.connections.filter((c) => c.url.pathname === '/ws/good.one/').length, 1)
  })

  test('topic names keep their colon in the URL and the token is sent as a query param', () => {
    const m = manager({ url: 'https://notify.example.com/' })
    assert.equal(m.url('user:42', 9, 'tok en'), 'wss://notify.example.com/ws/user:42/?token=tok+en&since=9')
    assert.equal(m.url('a.b', null, null), 'wss://notify.example.com/ws/a.b/')
  })
})
