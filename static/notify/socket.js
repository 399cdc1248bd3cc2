/**
 * Client for notify's plain JSON WebSocket protocol at `/ws/<topic>/`.
 *
 * Protocol: docs/js-client.md and the "Plain JSON WebSocket protocol" section of the realtime contract.
 * Plain ES module, no build step, no dependency: works in browsers, in Nuxt (client side) and in
 * Node >= 22 (or Node 20 with the `ws` package passed as `WebSocket`).
 *
 * Guarantees this module gives the application, per topic:
 * - one socket per topic; reconnects forever by default, with exponential backoff and full jitter
 *   capped at 30 s, so a fleet of browsers does not hammer a server that just restarted;
 * - resumes from the last `seq` it saw (`?since=`), and drops any `seq` it has already delivered,
 *   so a reconnect neither loses nor repeats notifications the server still retains;
 * - outgoing frames sent while disconnected are queued (bounded) and flushed in order on reconnect;
 * - a silent connection (no frame for a while after our ping) is treated as dead and replaced;
 * - no reconnect after `disconnect()`/`close()`, nor after a refusal that retrying cannot cure.
 *
 * @module notify/socket
 */

import { CloseCode, closeDecision, closeMeaning } from './codes.js'
import { admitSeq, backoffDelay } from './reconnect.js'

// Re-exported: applications written against this module import them from here.
export { CloseCode, closeMeaning, FATAL_CLOSE_CODES } from './codes.js'
export { backoffDelay } from './reconnect.js'

/**
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'stopped'|'closed'} TopicState
 *  - connecting: socket being opened; open: socket open (live once "subscribed" arrived);
 *  - reconnecting: waiting for the backoff delay; stopped: gave up (fatal close code, see `error`);
 *  - closed: closed on purpose by `disconnect()`/`close()`.
 */

/**
 * @typedef {object} NotifySocketOptions
 * @property {string} [url]  base URL of the server, e.g. "wss://notify.example.com" (http/https are
 *   turned into ws/wss). Default: the page's own origin.
 * @property {string|null|(() => (string|null|Promise<string|null>))} [token]  client token, or a
 *   function returning one (called before every connection attempt, so an expired token is replaced
 *   on reconnect). Null/absent: rely on the session cookie.
 * @property {import('./reconnect.js').BackoffOptions} [backoff]
 * @property {number} [maxAttempts=Infinity]  consecutive failed attempts after which a topic stops
 * @property {number} [heartbeatIntervalMs=25000]  how often we send {"type":"ping"}; below the
 *   server's 30 s so idle proxies that cut at ~60 s never see a quiet connection
 * @property {number} [heartbeatTimeoutMs=10000]  no frame at all for this long after a ping: the
 *   connection is dead (a half-open TCP connection never fires "close" by itself)
 * @property {number} [queueLimit=100]  frames kept per topic while disconnected
 * @property {'drop-oldest'|'reject'} [queueOverflow='drop-oldest']  when the queue is full:
 *   'drop-oldest' discards the oldest queued frame (a "dropped" event reports it), 'reject' refuses
 *   the new one (`send()` returns false, `publish()` rejects). Either way nothing grows unbounded.
 * @property {number} [maxMessageBytes=65536]  frames larger than this are refused locally (the
 *   server would close the socket with 1009)
 * @property {number} [ackTimeoutMs=10000]  `publish()` rejects when no ack arrives in this time
 * @property {typeof WebSocket} [WebSocket]  WebSocket implementation (default: the global one)
 * @property {boolean} [reconnectOnOnline=true]  in a browser, retry at once when the network returns
 */

/** @typedef {'notification'|'subscribed'|'reset'|'gap'|'ack'|'event'|'presence'|'message'|'open'|'close'|'error'|'state'|'reconnect'|'dropped'} NotifyEventName */

const OPEN = 1 // WebSocket.OPEN, spelled out so no global is needed at import time

/** Per-topic connection state. Internal. */
class TopicConnection {
  /** @param {string} topic @param {number|null} since */
  constructor(topic, since) {
    this.topic = topic
    /** @type {WebSocket|null} */
    this.ws = null
    /** @type {TopicState} */
    this.state = 'idle'
    this.attempt = 0
    /** Last seq delivered to the application; null = none yet (connect live only). */
    this.lastSeq = since
    /** @type {string[]} serialized frames waiting for an open socket, oldest first */
    this.queue = []
    this.reconnectTimer = null
    this.heartbeatTimer = null
    this.deadlineTimer = null
    this.lastFrameAt = 0
    this.holders = 0
    /** True while a connection attempt is fetching its token (so we do not start two). */
    this.dialing = false
  }
}

let refCounter = 0

/**
 * One WebSocket per topic to notify's plain protocol, with reconnect, resume, queueing and
 * heartbeats. Listen with `on(event, handler)`; every handler is called as `handler(payload, topic)`.
 *
 * Events: "notification" (the envelope), "subscribed" ({topic,last_seq}), "reset" (the server no
 * longer has everything after our seq: reload state), "gap" ({from,to}: seqs skipped by the server,
 * should never happen), "ack", "event", "presence", "message" (unknown frame types), "open",
 * "close" ({code,reason,willReconnect,delayMs}), "error" ({code,message,...}), "state"
 * ({state,previous}), "reconnect" ({attempt,delayMs}), "dropped" ({frame,reason}).
 */
export class NotifySocketManager {
  /** @param {NotifySocketOptions} [options] */
  constructor(options = {}) {
    this.options = {
      backoff: {},
      maxAttempts: Infinity,
      heartbeatIntervalMs: 25_000,
      heartbeatTimeoutMs: 10_000,
      queueLimit: 100,
      queueOverflow: 'drop-oldest',
      maxMessageBytes: 64 * 1024,
      ackTimeoutMs: 10_000,
      reconnectOnOnline: true,
      ...options,
    }
    if (!['drop-oldest', 'reject'].includes(this.options.queueOverflow)) {
      throw new TypeError(`queueOverflow must be 'drop-oldest' or 'reject'`)
    }
    /** @type {Map<string, TopicConnection>} */
    this.topics = new Map()
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map()
    /** @type {Map<string, {resolve: Function, reject: Function, timer: any, topic: string}>} */
    this.pending = new Map()
    this._onOnline = () => this._retryNow()
    // Registered on the first connect(), not here: a manager built during server-side rendering
    // (where connect() never runs) must not leave a listener on a worker's global scope.
    this._listeningOnline = false
  }

  // --- events -------------------------------------------------------------------------------

  /**
   * Register `handler` for `event`; returns a function that removes it.
   * @param {NotifyEventName|string} event
   * @param {(payload: any, topic: string|null) => void} handler
   * @returns {() => void}
   */
  on(event, handler) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set())
    this.listeners.get(event).add(handler)
    return () => this.off(event, handler)
  }

  /**
   * Remove a handler registered with `on`.
   * @param {string} event
   * @param {Function} handler
   */
  off(event, handler) {
    const set = this.listeners.get(event)
    if (!set) return
    set.delete(handler)
    if (set.size === 0) this.listeners.delete(event)
  }

  /** @param {string} event @param {any} payload @param {string|null} topic */
  _emit(event, payload, topic) {
    const set = this.listeners.get(event)
    if (!set) return
    // Copy: a handler may call off() while we iterate.
    for (const handler of [...set]) {
      try {
        handler(payload, topic)
      } catch (err) {
        // One broken handler must not stop delivery to the others nor kill the socket.
        queueMicrotask(() => {
          throw err
        })
      }
    }
  }

  // --- lifecycle ----------------------------------------------------------------------------

  /**
   * Open (or keep) the socket for `topic`. Idempotent: a second call for a live topic does nothing;
   * a call for a stopped topic starts it again.
   * @param {string} topic
   * @param {{since?: number|null}} [opts]  resume after this seq (e.g. one the app persisted);
   *   default: live only, or the last seq this manager saw for the topic
   * @returns {NotifySocketManager}
   */
  connect(topic, opts = {}) {
    if (
      !this._listeningOnline &&
      this.options.reconnectOnOnline &&
      typeof globalThis.addEventListener === 'function'
    ) {
      globalThis.addEventListener('online', this._onOnline)
      this._listeningOnline = true
    }
    let conn = this.topics.get(topic)
    if (!conn) {
      conn = new TopicConnection(topic, opts.since ?? null)
      this.topics.set(topic, conn)
    } else if (opts.since != null && (conn.lastSeq == null || opts.since > conn.lastSeq)) {
      conn.lastSeq = opts.since
    }
    if (conn.state === 'idle' || conn.state === 'stopped' || conn.state === 'closed') {
      conn.attempt = 0
      this._dial(conn)
    }
    return this
  }

  /**
   * Reference-counted `connect`: the socket stays open while at least one holder has not called
   * the returned release function. Used by the composables so two components on one topic can
   * share a manager.
   * @param {string} topic
   * @param {{since?: number|null}} [opts]
   * @returns {() => void} release
   */
  acquire(topic, opts = {}) {
    this.connect(topic, opts)
    const conn = this.topics.get(topic)
    conn.holders += 1
    let released = false
    return () => {
      if (released) return
      released = true
      conn.holders -= 1
      if (conn.holders <= 0 && this.topics.get(topic) === conn) this.disconnect(topic)
    }
  }

  /**
   * Close the socket of `topic` on purpose: no reconnect; queued frames are discarded (reported
   * as "dropped") and pending publishes rejected.
   * @param {string} topic
   */
  disconnect(topic) {
    const conn = this.topics.get(topic)
    if (!conn) return
    this.topics.delete(topic)
    this._stopTimers(conn)
    const ws = conn.ws
    conn.ws = null
    if (ws) {
      detach(ws)
      if (ws.readyState <= OPEN) ws.close(CloseCode.NORMAL, 'client disconnect')
    }
    for (const frame of conn.queue) this._emit('dropped', { frame: JSON.parse(frame), reason: 'disconnected' }, topic)
    conn.queue = []
    this._failPending(topic, new Error('disconnected'))
    this._setState(conn, 'closed')
  }

  /** Close every topic, and stop listening to the browser's "online" event. */
  close() {
    for (const topic of [...this.topics.keys()]) this.disconnect(topic)
    if (this._listeningOnline) {
      globalThis.removeEventListener('online', this._onOnline)
      this._listeningOnline = false
    }
  }

  // --- state --------------------------------------------------------------------------------

  /** @param {string} topic @returns {TopicState} */
  state(topic) {
    return this.topics.get(topic)?.state ?? 'closed'
  }

  /** Last seq delivered for `topic` (persist it to resume across page loads), or null.
   * @param {string} topic @returns {number|null} */
  lastSeq(topic) {
    return this.topics.get(topic)?.lastSeq ?? null
  }

  /** Frames waiting for `topic`'s socket. @param {string} topic @returns {number} */
  queued(topic) {
    return this.topics.get(topic)?.queue.length ?? 0
  }

  // --- sending ------------------------------------------------------------------------------

  /**
   * Send a frame on `topic`'s socket, or queue it until the socket is open. The topic must have
   * been connected. Frames are delivered in the order of `send` calls.
   * @param {string} topic
   * @param {object} message  a protocol frame, e.g. {type: "presence"}
   * @returns {boolean} false when the frame was refused (unknown topic, too large, queue full
   *   with the 'reject' policy); a "dropped" event says why
   */
  send(topic, message) {
    const conn = this.topics.get(topic)
    const text = JSON.stringify(message)
    if (!conn) {
      this._emit('dropped', { frame: message, reason: 'not connected to this topic' }, topic)
      return false
    }
    if (byteLength(text) > this.options.maxMessageBytes) {
      this._emit('dropped', { frame: message, reason: 'too large' }, topic)
      return false
    }
    if (conn.ws && conn.ws.readyState === OPEN && conn.queue.length === 0) {
      conn.ws.send(text)
      return true
    }
    if (conn.queue.length >= this.options.queueLimit) {
      if (this.options.queueOverflow === 'reject') {
        this._emit('dropped', { frame: message, reason: 'queue full' }, topic)
        return false
      }
      const oldest = conn.queue.shift()
      const dropped = JSON.parse(oldest)
      if (dropped.ref) this._failPending(topic, new Error('dropped: queue full'), dropped.ref)
      this._emit('dropped', { frame: dropped, reason: 'queue full' }, topic)
    }
    conn.queue.push(text)
    return true
  }

  /**
   * Publish a notification on `topic` (a user action; the server runs it through ingest).
   * Resolves with the server's ack ({type:"ack", ref, seq, id}); rejects with the server's error
   * frame, on timeout, or when the frame was dropped or the topic disconnected. A socket that drops
   * after sending leaves the outcome unknown: the promise then rejects with `outcomeUnknown`.
   * @param {string} topic
   * @param {string} event
   * @param {any} data
   * @param {{severity?: string}} [extra]
   * @returns {Promise<{type: 'ack', ref: string, seq: number, id: string}>}
   */
  publish(topic, event, data, extra = {}) {
    refCounter += 1
    const ref = `p${refCounter}`
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, topic, timer: null }
      this.pending.set(ref, entry)
      // Timed from the call: a publish queued through a long outage fails instead of hanging.
      entry.timer = setTimeout(() => {
        this.pending.delete(ref)
        reject(Object.assign(new Error('no ack in time'), { ref, outcomeUnknown: true }))
      }, this.options.ackTimeoutMs)
      const frame = { type: 'publish', event, data, ref }
      if (extra.severity) frame.severity = extra.severity
      if (!this.send(topic, frame)) {
        this._failPending(topic, new Error('publish refused locally'), ref)
      }
    })
  }

  /** @param {string} topic @param {Error} error @param {string} [onlyRef] */
  _failPending(topic, error, onlyRef) {
    for (const [ref, entry] of this.pending) {
      if (entry.topic !== topic || (onlyRef && ref !== onlyRef)) continue
      clearTimeout(entry.timer)
      this.pending.delete(ref)
      entry.reject(Object.assign(new Error(error.message), { ref }))
    }
  }

  // --- connection machinery -----------------------------------------------------------------

  /** @param {TopicConnection} conn */
  async _dial(conn) {
    if (conn.dialing) return
    conn.dialing = true
    this._setState(conn, 'connecting')
    let token = null
    try {
      token = await this._token()
    } catch (err) {
      conn.dialing = false
      if (this.topics.get(conn.topic) !== conn) return
      this._emit('error', { code: 'token', message: `token provider failed: ${err?.message ?? err}` }, conn.topic)
      this._scheduleReconnect(conn, { code: CloseCode.ABNORMAL, reason: 'token provider failed' })
      return
    }
    conn.dialing = false
    // disconnect() may have been called while we awaited the token.
    if (this.topics.get(conn.topic) !== conn || conn.state !== 'connecting') return
    const Impl = this.options.WebSocket ?? globalThis.WebSocket
    let ws
    try {
      if (!Impl) throw new Error('no WebSocket implementation: pass options.WebSocket')
      ws = new Impl(this.url(conn.topic, conn.lastSeq, token))
    } catch (err) {
      // A malformed URL or a missing WebSocket is a programming error that retrying cannot fix.
      this._emit('error', { code: 'url', message: String(err?.message ?? err) }, conn.topic)
      this._setState(conn, 'stopped')
      return
    }
    conn.ws = ws
    ws.onopen = () => conn.ws === ws && this._opened(conn)
    ws.onmessage = (ev) => conn.ws === ws && this._received(conn, ev.data)
    ws.onerror = () => {
      // Browsers give no detail here and always follow with "close"; reconnect happens there.
      if (conn.ws === ws) this._emit('error', { code: 'socket', message: 'WebSocket error' }, conn.topic)
    }
    ws.onclose = (ev) => conn.ws === ws && this._closed(conn, ev.code, ev.reason)
  }

  /**
   * The URL for `topic`, resuming after `since` when known.
   * @param {string} topic @param {number|null} since @param {string|null} token
   * @returns {string}
   */
  url(topic, since, token) {
    const base = wsBase(this.options.url)
    // Keep ':' readable (user:42); the ASGI server decodes the path either way.
    const path = encodeURIComponent(topic).replace(/%3A/gi, ':')
    const params = new URLSearchParams()
    if (token) params.set('token', token)
    if (since != null) params.set('since', String(since))
    const query = params.toString()
    return `${base}/ws/${path}/${query ? `?${query}` : ''}`
  }

  async _token() {
    const t = this.options.token
    if (typeof t === 'function') return (await t()) ?? null
    return t ?? null
  }

  /** @param {TopicConnection} conn */
  _opened(conn) {
    conn.lastFrameAt = Date.now()
    this._setState(conn, 'open')
    this._emit('open', { topic: conn.topic }, conn.topic)
    // Flush before anything else can be sent, so queued frames keep their order.
    const queue = conn.queue
    conn.queue = []
    for (const text of queue) conn.ws.send(text)
    this._startHeartbeat(conn)
  }

  /** @param {TopicConnection} conn @param {string|ArrayBuffer} raw */
  _received(conn, raw) {
    conn.lastFrameAt = Date.now()
    let frame
    try {
      frame = JSON.parse(typeof raw === 'string' ? raw : new TextDecoder().decode(raw))
    } catch {
      this._emit('error', { code: 'bad_frame', message: 'server sent a frame that is not JSON' }, conn.topic)
      return
    }
    const topic = conn.topic
    switch (frame?.type) {
      case 'notification':
        return this._notification(conn, frame)
      case 'subscribed':
        // The subscription works: only now is it safe to forget past failures (a server that
        // accepts and then closes at once would otherwise be retried in a tight loop).
        conn.attempt = 0
        if (conn.lastSeq == null && typeof frame.last_seq === 'number') conn.lastSeq = frame.last_seq
        return this._emit('subscribed', frame, topic)
      case 'reset':
        // Part of what we missed is gone, and the server replayed nothing: the stream goes on
        // after `last_seq`, so that is where we are now (a later resume must not ask again).
        if (typeof frame.last_seq === 'number') {
          conn.lastSeq = Math.max(conn.lastSeq ?? 0, frame.last_seq)
        }
        return this._emit('reset', frame, topic)
      case 'ping':
        if (conn.ws?.readyState === OPEN) conn.ws.send('{"type":"pong"}')
        return
      case 'pong':
        return
      case 'ack':
        this._settle(frame.ref, (p) => p.resolve(frame))
        return this._emit('ack', frame, topic)
      case 'error':
        if (frame.ref) {
          this._settle(frame.ref, (p) =>
            p.reject(Object.assign(new Error(frame.message ?? 'refused'), { code: frame.code, frame })),
          )
        }
        return this._emit('error', frame, topic)
      case 'event':
        return this._emit('event', frame, topic)
      case 'presence':
        return this._emit('presence', frame, topic)
      default:
        return this._emit('message', frame, topic)
    }
  }

  /** @param {string} ref @param {(p: any) => void} fn */
  _settle(ref, fn) {
    const entry = ref != null ? this.pending.get(ref) : undefined
    if (!entry) return
    clearTimeout(entry.timer)
    this.pending.delete(ref)
    fn(entry)
  }

  /** @param {TopicConnection} conn @param {any} frame */
  _notification(conn, frame) {
    const verdict = admitSeq(conn.lastSeq, frame.seq)
    if (!verdict.deliver) return // already delivered: replay overlap
    if (verdict.gap) this._emit('gap', verdict.gap, conn.topic)
    conn.lastSeq = verdict.lastSeq
    conn.attempt = 0
    this._emit('notification', frame, conn.topic)
  }

  /** @param {TopicConnection} conn @param {number} code @param {string} reason */
  _closed(conn, code, reason) {
    this._stopTimers(conn)
    conn.ws = null
    // 'renew-token' needs nothing more: every dial asks the token provider again.
    if (closeDecision(code, { canRenewToken: typeof this.options.token === 'function' }) === 'stop') {
      this._emit('close', { code, reason, willReconnect: false }, conn.topic)
      this._emit('error', { code, message: reason || closeMeaning(code), fatal: true }, conn.topic)
      this._failPending(conn.topic, new Error(reason || closeMeaning(code)))
      this._setState(conn, 'stopped')
      return
    }
    this._scheduleReconnect(conn, { code, reason })
  }

  /** @param {TopicConnection} conn @param {{code: number, reason: string}} why */
  _scheduleReconnect(conn, why) {
    // Frames written to a socket that then dropped may or may not have reached the server.
    this._failPendingSent(conn)
    if (conn.attempt >= this.options.maxAttempts) {
      this._emit('close', { ...why, willReconnect: false }, conn.topic)
      this._emit('error', { code: 'max_attempts', message: `gave up after ${conn.attempt} attempts` }, conn.topic)
      this._setState(conn, 'stopped')
      return
    }
    const delayMs = backoffDelay(conn.attempt, this.options.backoff)
    conn.attempt += 1
    this._emit('close', { ...why, willReconnect: true, delayMs }, conn.topic)
    this._setState(conn, 'reconnecting')
    this._emit('reconnect', { attempt: conn.attempt, delayMs }, conn.topic)
    conn.reconnectTimer = setTimeout(() => {
      conn.reconnectTimer = null
      if (this.topics.get(conn.topic) === conn && conn.state === 'reconnecting') this._dial(conn)
    }, delayMs)
  }

  /** Reject publishes already written to the socket that just dropped (outcome unknown).
   * @param {TopicConnection} conn */
  _failPendingSent(conn) {
    const stillQueued = new Set(conn.queue.map((text) => JSON.parse(text).ref).filter(Boolean))
    for (const [ref, entry] of this.pending) {
      if (entry.topic !== conn.topic || stillQueued.has(ref)) continue
      clearTimeout(entry.timer)
      this.pending.delete(ref)
      entry.reject(Object.assign(new Error('connection lost before ack'), { ref, outcomeUnknown: true }))
    }
  }

  /** The network came back (browser "online"): skip the remaining backoff of waiting topics. */
  _retryNow() {
    for (const conn of this.topics.values()) {
      if (conn.state !== 'reconnecting') continue
      clearTimeout(conn.reconnectTimer)
      conn.reconnectTimer = null
      this._dial(conn)
    }
  }

  /** @param {TopicConnection} conn */
  _startHeartbeat(conn) {
    const { heartbeatIntervalMs, heartbeatTimeoutMs } = this.options
    if (!(heartbeatIntervalMs > 0)) return
    const ws = conn.ws
    conn.heartbeatTimer = setInterval(() => {
      if (conn.ws !== ws || ws.readyState !== OPEN) return
      const pingAt = Date.now()
      ws.send('{"type":"ping"}')
      // Not cleared by the next ping (the timeout may be longer than the interval); the `ws`
      // check keeps a late deadline from touching a newer socket.
      conn.deadlineTimer = setTimeout(() => {
        // Any frame since the ping (pong, notification, server ping) proves the peer is alive.
        if (conn.ws === ws && conn.lastFrameAt < pingAt) this._dead(conn)
      }, heartbeatTimeoutMs)
    }, heartbeatIntervalMs)
  }

  /** The socket went silent: drop it without waiting for a close handshake that may never come.
   * @param {TopicConnection} conn */
  _dead(conn) {
    const ws = conn.ws
    if (!ws) return
    detach(ws)
    try {
      ws.close(CloseCode.CLIENT_HEARTBEAT_TIMEOUT, 'heartbeat timeout')
    } catch {
      // Closing an already broken socket may throw in some implementations; it is gone either way.
    }
    this._closed(conn, CloseCode.CLIENT_HEARTBEAT_TIMEOUT, 'no answer to ping')
  }

  /** @param {TopicConnection} conn */
  _stopTimers(conn) {
    clearTimeout(conn.reconnectTimer)
    clearInterval(conn.heartbeatTimer)
    clearTimeout(conn.deadlineTimer)
    conn.reconnectTimer = conn.heartbeatTimer = conn.deadlineTimer = null
  }

  /** @param {TopicConnection} conn @param {TopicState} state */
  _setState(conn, state) {
    if (conn.state === state) return
    const previous = conn.state
    conn.state = state
    this._emit('state', { state, previous }, conn.topic)
  }
}

/** @param {WebSocket} ws */
function detach(ws) {
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null
}

/** @param {string} text @returns {number} */
function byteLength(text) {
  return new TextEncoder().encode(text).length
}

/** @param {string|undefined} url @returns {string} ws(s)://host[:port][/prefix] without trailing slash */
function wsBase(url) {
  let base = url
  if (!base) {
    if (typeof location === 'undefined') throw new Error('options.url is required outside a browser')
    base = location.origin
  }
  return base.replace(/^http(s?):\/\//i, 'ws$1://').replace(/\/+$/, '')
}
