// Unit tests of static/notify/sse.js (NotifyEventStream) and of the composable over it, with a
// scripted EventSource that behaves as the HTML spec's does: the browser's own reconnect keeps the
// last event id, a refusal leaves it CLOSED, an event without `id:` reports the last id seen.
// The real-server counterparts are in tests/test_js_client.py.
// Run: node --test tests/js/sse.test.js   (pytest runs it from tests/test_js_client.py)
import assert from 'node:assert/strict'
import { register } from 'node:module'
import { after, describe, test } from 'node:test'

import { NotifyEventStream } from '../../static/notify/sse.js'

import { scriptedEventSource, waitFor } from './scripted.js'

register('./resolve-vue.js', import.meta.url)
const { effectScope, nextTick } = await import('vue')
const { useServerSentEvents } = await import('../../static/notify/composables.js')

const BASE = 'http://notify.test/events/alerts.k8s/'
const FAST = { baseMs: 8, maxMs: 20 }

const streams = []
after(() => streams.forEach((s) => s.close()))

function stream(options = {}) {
  const Impl = options.EventSource ?? scriptedEventSource()
  const s = new NotifyEventStream(BASE, { events: ['pod.crash'], backoff: FAST, ...options, EventSource: Impl })
  streams.push(s)
  return { s, Impl }
}

const seqsOf = (s) => {
  const seqs = []
  s.on('event', (e) => seqs.push(e.data.seq))
  return seqs
}

describe('NotifyEventStream', () => {
  test('is connected only once the server says subscribed, and no longer after a drop', async () => {
    const { s, Impl } = stream()
    const seen = []
    s.on('state', ({ state }) => seen.push([state, s.connected]))
    s.open()
    const es = await Impl.nth(1)
    es.open()
    assert.deepEqual([s.state, s.connected], ['open', false])
    const subscribed = waitFor(s, 'subscribed')
    es.subscribed(0)
    assert.deepEqual(await subscribed, { type: 'subscribed', topic: 'alerts.k8s', last_seq: 0 })
    assert.equal(s.connected, true)
    es.drop()
    assert.deepEqual([s.state, s.connected], ['reconnecting', false])
    es.open() // the browser's own reconnect: the HTTP stream again, not yet live
    assert.deepEqual([s.state, s.connected], ['open', false])
    es.subscribed(0)
    assert.equal(s.connected, true)
    assert.deepEqual(seen, [
      ['connecting', false],
      ['open', false],
      ['reconnecting', false],
      ['open', false],
    ])
  })

  test("drops seqs replayed by the browser's own reconnect", async () => {
    const { s, Impl } = stream()
    const seqs = seqsOf(s)
    s.open()
    const es = await Impl.nth(1)
    es.open()
    for (const seq of [1, 2, 3]) es.notify(seq)
    es.drop()
    es.open()
    for (const seq of [2, 3, 4]) es.notify(seq) // replay overlapping what we had, then new
    es.subscribed(4)
    es.notify(5)
    assert.deepEqual(seqs, [1, 2, 3, 4, 5])
    assert.equal(s.lastEventId, '5')
    assert.equal(Impl.instances.length, 1)
  })

  test('after the browser gives up, reopens with a fresh token and lastEventId', async () => {
    const tokens = ['expired', 'fresh']
    const calls = []
    const { s, Impl } = stream({
      token: async () => {
        calls.push(tokens[0])
        return tokens.shift()
      },
    })
    const seqs = seqsOf(s)
    s.open()
    const first = await Impl.nth(1)
    first.open()
    first.notify(1)
    first.notify(2)
    const reconnect = waitFor(s, 'reconnect')
    const error = waitFor(s, 'error')
    first.refuse() // the server restarted and answered 401 to the browser's own retry
    assert.equal((await error).type, 'error')
    assert.equal((await reconnect).attempt, 1)
    const second = await Impl.nth(2)
    assert.deepEqual(calls, ['expired', 'fresh'])
    assert.equal(first.url.searchParams.get('token'), 'expired')
    assert.equal(first.url.searchParams.get('lastEventId'), null)
    assert.equal(second.url.searchParams.get('token'), 'fresh')
    assert.equal(second.url.searchParams.get('lastEventId'), '2')
    second.open()
    for (const seq of [2, 3]) second.notify(seq)
    assert.deepEqual(seqs, [1, 2, 3])
  })

  test('reconnects with full-jitter backoff, its attempt count reset once a stream opens', async () => {
    const { s, Impl } = stream()
    const reconnects = []
    s.on('reconnect', (r) => reconnects.push(r))
    s.open()
    for (let n = 1; n <= 4; n += 1) (await Impl.nth(n)).refuse()
    const fifth = await Impl.nth(5)
    assert.deepEqual(reconnects.map((r) => r.attempt), [1, 2, 3, 4])
    for (const { attempt, delayMs } of reconnects) {
      const ceiling = Math.min(FAST.maxMs, FAST.baseMs * 2 ** (attempt - 1))
      assert.ok(delayMs >= 0 && delayMs < ceiling, `attempt ${attempt}: ${delayMs} >= ${ceiling}`)
      assert.ok(Number.isInteger(delayMs))
    }
    fifth.open()
    fifth.refuse()
    await Impl.nth(6)
    assert.equal(reconnects.at(-1).attempt, 1)
  })

  test('a failing token provider is retried after a backoff', async () => {
    let calls = 0
    const { s, Impl } = stream({
      token: async () => {
        calls += 1
        if (calls === 1) throw new Error('token endpoint answered 500')
        return 'tok'
      },
    })
    const error = waitFor(s, 'error')
    s.open()
    assert.equal((await error).message, 'token endpoint answered 500')
    const es = await Impl.nth(1)
    assert.equal(es.url.searchParams.get('token'), 'tok')
  })

  test('resumes from a given lastEventId, django-eventstream form included', async () => {
    const { s, Impl } = stream({ lastEventId: 'alerts.k8s:7' })
    const seqs = seqsOf(s)
    s.open()
    const es = await Impl.nth(1)
    assert.equal(es.url.searchParams.get('lastEventId'), 'alerts.k8s:7')
    es.open()
    for (const seq of [6, 7, 8]) es.notify(seq)
    assert.deepEqual(seqs, [8])
  })

  test('a reset is reported and becomes the position; nothing before it is delivered', async () => {
    const { s, Impl } = stream({ lastEventId: '2' })
    const seqs = seqsOf(s)
    const resets = []
    s.on('reset', (r) => resets.push(r))
    s.open()
    const es = await Impl.nth(1)
    es.open()
    const notice = { type: 'reset', topic: 'alerts.k8s', since: 2, oldest_seq: 50, last_seq: 60 }
    es.send('reset', notice, 60)
    es.subscribed(60)
    es.notify(59) // never sent by the server; stands for any seq at or before the reset
    es.notify(61)
    assert.deepEqual(resets, [{ type: 'reset', id: '60', data: notice }])
    assert.deepEqual(seqs, [61])
    es.refuse()
    const next = await Impl.nth(2)
    assert.equal(next.url.searchParams.get('lastEventId'), '61')
  })

  test('ephemeral events (no id) are delivered after a notification, not taken for duplicates', async () => {
    const { s, Impl } = stream({ events: ['pod.crash', 'reverse_flow_update'] })
    const items = []
    s.on('event', (e) => items.push([e.type, e.data.type]))
    s.open()
    const es = await Impl.nth(1)
    es.open()
    es.notify(1)
    es.send('reverse_flow_update', { type: 'event', topic: 'alerts.k8s', event: 'reverse_flow_update', payload: {} })
    es.send('reverse_flow_update', { type: 'event', topic: 'alerts.k8s', event: 'reverse_flow_update', payload: {} })
    assert.deepEqual(items, [
      ['pod.crash', 'notification'],
      ['reverse_flow_update', 'event'],
      ['reverse_flow_update', 'event'],
    ])
    assert.equal(s.lastEventId, '1')
  })

  test('stream-error is reported and left to the browser, which reconnects by itself', async () => {
    const { s, Impl } = stream()
    const errors = []
    s.on('error', (e) => errors.push(e))
    s.open()
    const es = await Impl.nth(1)
    es.open()
    es.send('stream-error', { type: 'error', code: 'unavailable', message: 'retrying' })
    es.drop()
    assert.deepEqual(errors, [{ type: 'stream-error', data: '{"type":"error","code":"unavailable","message":"retrying"}' }])
    assert.equal(s.state, 'reconnecting')
    assert.equal(Impl.instances.length, 1)
  })

  test('close() stops for good: no reconnect, and a token arriving late opens nothing', async () => {
    let release
    const { s, Impl } = stream({ token: () => new Promise((resolve) => (release = resolve)) })
    s.open()
    s.close()
    release('late')
    await new Promise((resolve) => setImmediate(resolve))
    assert.equal(Impl.instances.length, 0)
    assert.equal(s.state, 'closed')

    const other = stream()
    other.s.open()
    const es = await other.Impl.nth(1)
    const states = []
    other.s.on('state', ({ state }) => states.push(state))
    other.s.close()
    assert.equal(es.readyState, 2)
    es.refuse() // detached: the old source's handlers no longer reach the stream
    assert.deepEqual(states, ['closed'])
  })
})

describe('useServerSentEvents over NotifyEventStream', () => {
  test('connected turns true on subscribed, not when the HTTP stream opens', async () => {
    const Impl = scriptedEventSource()
    const scope = effectScope()
    let sse
    scope.run(() => {
      sse = useServerSentEvents(BASE, { events: ['pod.crash'], EventSource: Impl })
    })
    const es = await Impl.nth(1)
    es.open()
    assert.deepEqual([sse.state.value, sse.connected.value], ['open', false])
    es.subscribed(0)
    assert.equal(sse.connected.value, true)
    es.notify(1)
    es.notify(1)
    assert.deepEqual(sse.events.value.map((e) => e.data.seq), [1])
    assert.equal(sse.lastEventId.value, '1')
    es.drop()
    assert.deepEqual([sse.state.value, sse.connected.value], ['reconnecting', false])
    scope.stop()
    assert.deepEqual([sse.state.value, sse.connected.value], ['closed', false])
    assert.equal(es.readyState, 2)
  })

  test('a reactive URL starts over on the new stream', async () => {
    const Impl = scriptedEventSource()
    const { ref } = await import('vue')
    const url = ref(BASE)
    const scope = effectScope()
    let sse
    scope.run(() => {
      sse = useServerSentEvents(url, { events: ['pod.crash'], lastEventId: '4', EventSource: Impl })
    })
    const first = await Impl.nth(1)
    assert.equal(first.url.searchParams.get('lastEventId'), '4')
    first.open()
    first.notify(5)
    url.value = 'http://notify.test/events/alerts.other/'
    await nextTick()
    const second = await Impl.nth(2)
    assert.equal(first.readyState, 2)
    assert.equal(second.url.pathname, '/events/alerts.other/')
    assert.equal(second.url.searchParams.get('lastEventId'), null)
    assert.deepEqual([sse.events.value, sse.lastEventId.value], [[], null])
    second.open()
    second.notify(1)
    assert.deepEqual(sse.events.value.map((e) => e.data.seq), [1])
    scope.stop()
  })
})
