// Scripted stand-ins for the browser's EventSource and WebSocket, for the node unit tests of
// static/notify/ (sse.test.js, fallback.test.js), and `waitFor`, which every such test uses. The
// test plays the server: it opens, sends, drops or refuses each instance, which behaves as the
// HTML spec's does.

/** Wait until `list` has `n` items (1-based), then resolve with the n-th (5 s limit). */
function nthOf(list, waiters, n, what) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (list.length < n) return false
      resolve(list[n - 1])
      return true
    }
    if (check()) return
    const timer = setTimeout(() => reject(new Error(`no ${what} #${n}`)), 5000)
    waiters.push(() => check() && (clearTimeout(timer), true))
  })
}

/** @param {(() => boolean)[]} waiters */
function wake(waiters) {
  for (const w of [...waiters]) if (w()) waiters.splice(waiters.indexOf(w), 1)
}

/** A scripted EventSource; each instance is recorded in its class's `instances`. */
export function scriptedEventSource() {
  const waiters = []
  class ScriptedEventSource {
    static instances = []

    /** Resolve with instance number `n` (1-based) once it exists (5 s limit). */
    static nth(n) {
      return nthOf(ScriptedEventSource.instances, waiters, n, 'EventSource')
    }

    constructor(url, init) {
      this.url = new URL(url)
      this.init = init
      this.readyState = 0
      this.lastId = ''
      this.handlers = new Map()
      this.onopen = this.onerror = null
      ScriptedEventSource.instances.push(this)
      wake(waiters)
    }
    addEventListener(type, fn) {
      if (!this.handlers.has(type)) this.handlers.set(type, new Set())
      this.handlers.get(type).add(fn)
    }
    removeEventListener(type, fn) {
      this.handlers.get(type)?.delete(fn)
    }
    close() {
      this.readyState = 2
    }
    // --- the server's side -------------------------------------------------------------------
    open() {
      this.readyState = 1
      this.onopen?.({ type: 'open' })
    }
    /** Dispatch one event; `id` undefined: no `id:` line (the last id is reported, per spec). */
    send(type, data, id) {
      if (id !== undefined) this.lastId = String(id)
      const ev = { type, data: typeof data === 'string' ? data : JSON.stringify(data), lastEventId: this.lastId }
      for (const fn of [...(this.handlers.get(type) ?? [])]) fn(ev)
    }
    notify(seq, event = 'pod.crash') {
      this.send(event, { type: 'notification', topic: 'alerts.k8s', seq, event, data: { seq } }, seq)
    }
    subscribed(lastSeq) {
      this.send('subscribed', { type: 'subscribed', topic: 'alerts.k8s', last_seq: lastSeq })
    }
    /** The connection dropped; the browser reconnects by itself (readyState CONNECTING). */
    drop() {
      this.readyState = 0
      this.onerror?.({ type: 'error' })
    }
    /** An HTTP refusal (401, 403...): the browser gives up for good (readyState CLOSED). */
    refuse() {
      this.readyState = 2
      this.onerror?.({ type: 'error' })
    }
  }
  return ScriptedEventSource
}

/** A scripted WebSocket (readyState, on* handlers); frames the client sends are kept in `sent`. */
export function scriptedWebSocket() {
  const waiters = []
  class ScriptedWebSocket {
    static instances = []

    /** Resolve with instance number `n` (1-based) once it exists (5 s limit). */
    static nth(n) {
      return nthOf(ScriptedWebSocket.instances, waiters, n, 'WebSocket')
    }

    constructor(url) {
      this.url = new URL(url)
      this.readyState = 0
      this.sent = []
      this.onopen = this.onmessage = this.onerror = this.onclose = null
      ScriptedWebSocket.instances.push(this)
      wake(waiters)
    }
    send(text) {
      this.sent.push(JSON.parse(text))
    }
    close() {
      this.readyState = 3
    }
    // --- the server's side -------------------------------------------------------------------
    open() {
      this.readyState = 1
      this.onopen?.({ type: 'open' })
    }
    frame(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) })
    }
    subscribed(lastSeq, topic = 'alerts.k8s') {
      this.frame({ type: 'subscribed', topic, last_seq: lastSeq })
    }
    notify(seq, topic = 'alerts.k8s') {
      this.frame({ type: 'notification', topic, seq, event: 'pod.crash', data: { seq } })
    }
    /** The connection failed or dropped without a close frame (a refused upgrade: 1006). */
    drop() {
      this.readyState = 3
      this.onerror?.({ type: 'error' })
      this.onclose?.({ code: 1006, reason: '' })
    }
  }
  return ScriptedWebSocket
}

/**
 * Resolve with the first payload of `event` on `emitter` (a manager or a stream: `on()` returns
 * the function that removes the handler) for which `predicate(...handler arguments)` holds
 * (5 s limit).
 */
export function waitFor(emitter, event, predicate = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off()
      reject(new Error(`timed out waiting for ${event}`))
    }, 5000)
    const off = emitter.on(event, (...args) => {
      if (!predicate(...args)) return
      clearTimeout(timer)
      off()
      resolve(args[0])
    })
  })
}
