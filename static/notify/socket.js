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
 * - no reconnect after `disconnect()`/`close()`, nor after a refusal that retrying cannot cure;
 * - where WebSockets cannot be used (a proxy that refuses the upgrade, a socket that never opens),
 *   it falls back to Server-Sent Events (`NotifyEventStream`, sse.js) with the same events, resume
 *   and de-duplication, publishes over HTTP meanwhile, and goes back to the WebSocket once one
 *   works again (docs/js-client.md, "Fallback to SSE");
 * - with `persist`, the last notifications and seq of each topic outlive the page: the next load
 *   shows them at once (flagged `cached`) and resumes after that seq (persist.js).
 *
 * @module notify/socket
 */

import { CloseCode, closeDecision, closeMeaning } from './codes.js'
import { fallbackOptions, postPublish, retryDelay } from './fallback.js'
import { TopicStore } from './persist.js'
import { admitSeq, backoffDelay } from './reconnect.js'
import { NotifyEventStream } from './sse.js'

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
 * @property {boolean|FallbackOptions} [fallback=true]  fall back to SSE where WebSockets cannot be
 *   used (only where an EventSource implementation exists); false: WebSocket only
 * @property {typeof EventSource} [EventSource]  EventSource implementation (default: the global one)
 * @property {typeof fetch} [fetch]  fetch implementation for publishing over HTTP (default: global)
 * @property {boolean|import('./persist.js').StorageAdapter} [persist=false]  keep each topic's
 *   last notifications and seq across page loads: true (localStorage) or a storage adapter
 * @property {number} [persistLimit=50]  notifications kept per topic by `persist`
 * @property {string} [persistKey='notify']  prefix of the storage keys (`<persistKey>:<topic>`);
 *   give each server and user its own (e.g. `notify:${userId}`)
 */

/** @typedef {import('./fallback.js').FallbackOptions} FallbackOptions */
/** @typedef {import('./fallback.js').Transport} Transport */

/** @typedef {'notification'|'subscribed'|'reset'|'gap'|'ack'|'event'|'presence'|'message'|'open'|'close'|'error'|'state'|'reconnect'|'dropped'|'transport'|'cached'} NotifyEventName */

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
    /** @type {Transport} what delivers the topic now */
    this.transport = 'websocket'
    /** Did the current WebSocket open / say `subscribed`? */
    this.wsOpened = false
    this.wsSubscribed = false
    /** Consecutive WebSockets that failed before `subscribed` (counted towards the fallback). */
    this.wsFailures = 0
    this.openTimer = null
    /** @type {NotifyEventStream|null} the SSE stream while on the fallback */
    this.stream = null
    /** @type {(() => void)[]} */
    this.streamOff = []
    /** While on SSE: the timer of the next WebSocket try, and how many tries failed. */
    this.probeTimer = null
    this.probeAttempt = 0
    /** HTTP publishes of this topic, one after the other (they keep the order of the calls). */
    this.httpChain = Promise.resolve()
    /** With `persist`: the last notifications delivered (oldest first), and those restored. */
    this.recent = []
    this.cached = []
    /** @type {Promise<void>|null} an async storage still loading the stored state */
    this.restoring = null
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
 * ({state,previous}), "reconnect" ({attempt,delayMs}), "dropped" ({frame,reason}),
 * "transport" ({transport,previous,reason}: the topic moved to 'sse' or back to 'websocket'),
 * "cached" ({notifications,lastSeq}: the state `persist` kept from an earlier page load, each
 * notification flagged `cached: true`; emitted during `connect()` with a synchronous storage).
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
    /** @type {Required<FallbackOptions>|null} */
    this.fallback = fallbackOptions(this.options.fallback)
    /** @type {TopicStore|null} */
    this.store = this.options.persist
      ? new TopicStore(this.options.persist, { limit: this.options.persistLimit, prefix: this.options.persistKey })
      : null
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
      if (this.store) this._restore(conn)
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
    this._closeStream(conn)
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

  /** What delivers `topic` now: 'websocket', or 'sse' while on the fallback (a "transport"
   * event says when it changes). @param {string} topic @returns {Transport} */
  transport(topic) {
    return this.topics.get(topic)?.transport ?? 'websocket'
  }

  /** The notifications `persist` restored for `topic` from an earlier page load, each with
   * `cached: true` (empty without `persist`, or before an async storage answered).
   * @param {string} topic @returns {object[]} */
  cached(topic) {
    return this.topics.get(topic)?.cached.slice() ?? []
  }

  /** Forget what `persist` stored for `topic` (e.g. when the user logs out). @param {string} topic */
  forget(topic) {
    this.store?.remove(topic)
    const conn = this.topics.get(topic)
    if (conn) conn.recent = conn.cached = []
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
      const entry = { resolve, reject, topic, timer: null, via: 'socket' }
      this.pending.set(ref, entry)
      // Timed from the call: a publish queued through a long outage fails instead of hanging.
      entry.timer = setTimeout(() => {
        this.pending.delete(ref)
        reject(Object.assign(new Error('no ack in time'), { ref, outcomeUnknown: true }))
      }, this.options.ackTimeoutMs)
      const frame = { type: 'publish', event, data, ref }
      if (extra.severity) frame.severity = extra.severity
      const conn = this.topics.get(topic)
      if (conn?.transport === 'sse') {
        this._publishOverHttp(conn, frame)
      } else if (!this.send(topic, frame)) {
        this._failPending(topic, new Error('publish refused locally'), ref)
      }
    })
  }

  /**
   * Publish `frame` with `POST /api/v1/topics/<topic>/publish` and the client token (while on
   * SSE); settles its pending entry as the socket's ack or error frame would.
   * @param {TopicConnection} conn @param {{ref: string, event: string, data: any, severity?: string}} frame
   */
  _publishOverHttp(conn, frame) {
    const entry = this.pending.get(frame.ref)
    if (!entry) return
    entry.via = 'http'
    conn.httpChain = conn.httpChain.then(() => this._postPublish(conn.topic, frame))
  }

  /** @param {string} topic @param {{ref: string, event: string, data: any, severity?: string}} frame */
  async _postPublish(topic, frame) {
    const { ref } = frame
    if (!this.pending.has(ref)) return // timed out or disconnected meanwhile
    try {
      const ack = await postPublish(this.publishUrl(topic), frame, {
        token: () => this._token(),
        fetch: this.options.fetch ?? globalThis.fetch,
        maxBytes: this.options.maxMessageBytes,
      })
      this._settle(ref, (p) => p.resolve(ack))
      this._emit('ack', ack, topic)
    } catch (err) {
      err.ref = ref
      this._settle(ref, (p) => p.reject(err))
      this._emit('error', { code: err.code, message: err.message, ref, status: err.status }, topic)
    }
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
    // While on SSE a dial is a try of the WebSocket: the topic's state is the stream's.
    const probing = conn.transport === 'sse'
    if (!probing) this._setState(conn, 'connecting')
    let token = null
    try {
      if (conn.restoring) await conn.restoring // resume after the stored seq, not before it
      token = await this._token()
    } catch (err) {
      conn.dialing = false
      if (this.topics.get(conn.topic) !== conn) return
      this._emit('error', { code: 'token', message: `token provider failed: ${err?.message ?? err}` }, conn.topic)
      if (probing) this._scheduleProbe(conn)
      else this._scheduleReconnect(conn, { code: CloseCode.ABNORMAL, reason: 'token provider failed' })
      return
    }
    conn.dialing = false
    // disconnect() may have been called while we awaited the token.
    if (this.topics.get(conn.topic) !== conn) return
    if (probing ? conn.transport !== 'sse' || conn.ws : conn.state !== 'connecting') return
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
    conn.wsOpened = conn.wsSubscribed = false
    if (this._fallbackOn()) {
      conn.openTimer = setTimeout(() => {
        conn.openTimer = null
        if (conn.ws === ws && !conn.wsOpened) this._socketNeverOpened(conn, ws)
      }, this.fallback.openTimeoutMs)
    }
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
    const path = topicPath(topic)
    const params = new URLSearchParams()
    if (token) params.set('token', token)
    if (since != null) params.set('since', String(since))
    const query = params.toString()
    return `${base}/ws/${path}/${query ? `?${query}` : ''}`
  }

  /** The SSE fallback's stream of `topic` (every notification as an unnamed event).
   * @param {string} topic @returns {string} */
  eventsUrl(topic) {
    return `${httpBase(this.options.url)}/events/${topicPath(topic)}/?unnamed=1`
  }

  /** Where `publish` posts while on SSE. @param {string} topic @returns {string} */
  publishUrl(topic) {
    return `${httpBase(this.options.url)}/api/v1/topics/${topicPath(topic)}/publish`
  }

  async _token() {
    const t = this.options.token
    if (typeof t === 'function') return (await t()) ?? null
    return t ?? null
  }

  /** @param {TopicConnection} conn */
  _opened(conn) {
    clearTimeout(conn.openTimer)
    conn.openTimer = null
    conn.wsOpened = true
    conn.lastFrameAt = Date.now()
    if (conn.transport === 'websocket') {
      this._setState(conn, 'open')
      this._emit('open', { topic: conn.topic }, conn.topic)
    }
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
        conn.attempt = conn.wsFailures = 0
        conn.wsSubscribed = true
        this._subscribed(conn, frame)
        // Live on the socket (replayed from our seq, so no gap): the SSE stream can go.
        if (conn.transport === 'sse') this._switchToSocket(conn)
        return this._emit('subscribed', frame, topic)
      case 'reset':
        return this._reset(conn, frame)
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

  /** One rule for both transports: each seq once, in order, whichever delivered it first.
   * @param {TopicConnection} conn @param {any} frame */
  _notification(conn, frame) {
    const verdict = admitSeq(conn.lastSeq, frame.seq)
    if (!verdict.deliver) return // already delivered: replay overlap, or the other transport
    if (verdict.gap) this._emit('gap', verdict.gap, conn.topic)
    conn.lastSeq = verdict.lastSeq
    conn.attempt = 0
    if (this.store) {
      const keep = this.store.limit - 1 // and this one
      conn.recent = [...(keep > 0 ? conn.recent.slice(-keep) : []), frame]
      this._persist(conn)
    }
    this._emit('notification', frame, conn.topic)
  }

  /** A `subscribed` from either transport. @param {TopicConnection} conn @param {any} frame */
  _subscribed(conn, frame) {
    if (conn.lastSeq == null && typeof frame?.last_seq === 'number') {
      conn.lastSeq = frame.last_seq
      this._persist(conn) // the next page load resumes from here, even if nothing arrives
    }
  }

  /** A `reset` from either transport. @param {TopicConnection} conn @param {any} frame */
  _reset(conn, frame) {
    // Part of what we missed is gone, and the server replayed nothing: the stream goes on
    // after `last_seq`, so that is where we are now (a later resume must not ask again).
    if (typeof frame?.last_seq === 'number') {
      conn.lastSeq = Math.max(conn.lastSeq ?? 0, frame.last_seq)
      this._persist(conn)
    }
    this._emit('reset', frame, conn.topic)
  }

  /** @param {TopicConnection} conn */
  _persist(conn) {
    this.store?.save(conn.topic, { lastSeq: conn.lastSeq, notifications: conn.recent })
  }

  /** Load what `persist` kept for `conn`'s topic: at once from a synchronous storage, else
   * before the first dial. @param {TopicConnection} conn */
  _restore(conn) {
    const apply = (state) => {
      conn.restoring = null
      if (!state || this.topics.get(conn.topic) !== conn) return
      conn.recent = state.notifications
      if (state.lastSeq != null && (conn.lastSeq == null || state.lastSeq > conn.lastSeq)) conn.lastSeq = state.lastSeq
      conn.cached = state.notifications.map((n) => ({ ...n, cached: true }))
      this._emit('cached', { notifications: conn.cached.slice(), lastSeq: conn.lastSeq }, conn.topic)
    }
    const loaded = this.store.load(conn.topic)
    if (loaded && typeof loaded.then === 'function') conn.restoring = loaded.then(apply)
    else apply(loaded)
  }

  // --- the SSE fallback -------------------------------------------------------------------------

  /** Is the fallback on, and can it work here (an EventSource implementation)? */
  _fallbackOn() {
    return !!this.fallback && !!(this.options.EventSource ?? globalThis.EventSource)
  }

  /** The socket is still not open after `openTimeoutMs` (a proxy holding the upgrade).
   * @param {TopicConnection} conn @param {WebSocket} ws */
  _socketNeverOpened(conn, ws) {
    detach(ws)
    try {
      ws.close()
    } catch {
      // A socket still connecting may refuse close() in some implementations; it is dropped.
    }
    conn.ws = null
    this._stopTimers(conn)
    const why = { code: CloseCode.ABNORMAL, reason: `WebSocket not open after ${this.fallback.openTimeoutMs} ms` }
    if (conn.transport === 'sse') return this._scheduleProbe(conn)
    this._failPendingSent(conn)
    this._emit('close', { ...why, willReconnect: true, fallback: 'sse' }, conn.topic)
    this._fallBack(conn, why)
  }

  /** Deliver `conn`'s topic over SSE from its last seq, and try the WebSocket again later.
   * @param {TopicConnection} conn @param {{code: number, reason: string}} why */
  _fallBack(conn, why) {
    conn.transport = 'sse'
    conn.wsFailures = 0
    conn.probeAttempt = 0
    this._emit('transport', { transport: 'sse', previous: 'websocket', reason: why.reason || closeMeaning(why.code) }, conn.topic)
    this._openStream(conn)
    // Publishes waiting for the socket go over HTTP now, in their order; other frames wait.
    const waiting = conn.queue
    conn.queue = []
    for (const text of waiting) {
      const frame = JSON.parse(text)
      if (frame.type === 'publish' && this.pending.has(frame.ref)) this._publishOverHttp(conn, frame)
      else conn.queue.push(text)
    }
    this._scheduleProbe(conn)
  }

  /** @param {TopicConnection} conn */
  _openStream(conn) {
    const topic = conn.topic
    const stream = new NotifyEventStream(this.eventsUrl(topic), {
      token: this.options.token,
      lastEventId: conn.lastSeq != null ? String(conn.lastSeq) : null,
      backoff: this.options.backoff,
      EventSource: this.options.EventSource,
      withCredentials: this.fallback.withCredentials ?? this.options.token == null,
    })
    conn.stream = stream
    const on = (event, fn) => conn.streamOff.push(stream.on(event, (payload) => conn.stream === stream && fn(payload)))
    on('event', ({ data }) => {
      if (data?.type === 'notification') this._notification(conn, data)
      else if (data?.type === 'event') this._emit('event', data, topic)
      else this._emit('message', data, topic)
    })
    on('subscribed', (frame) => {
      conn.attempt = 0
      this._subscribed(conn, frame)
      this._emit('subscribed', frame, topic)
    })
    on('reset', ({ data }) => this._reset(conn, data))
    on('state', ({ state }) => {
      if (state !== 'closed' && state !== 'idle') this._setState(conn, state)
    })
    on('open', () => this._emit('open', { topic, transport: 'sse' }, topic))
    on('error', (err) => {
      const message = err instanceof Error ? err.message : (err?.data ?? 'event stream error')
      this._emit('error', { code: 'sse', message: String(message) }, topic)
    })
    stream.open()
  }

  /** @param {TopicConnection} conn */
  _closeStream(conn) {
    for (const off of conn.streamOff) off()
    conn.streamOff = []
    conn.stream?.close()
    conn.stream = null
  }

  /** While on SSE: try a WebSocket again after a growing, jittered delay.
   * @param {TopicConnection} conn */
  _scheduleProbe(conn) {
    if (this.topics.get(conn.topic) !== conn || conn.transport !== 'sse') return
    clearTimeout(conn.probeTimer)
    const delayMs = retryDelay(conn.probeAttempt, this.fallback.retry)
    conn.probeAttempt += 1
    conn.probeTimer = setTimeout(() => {
      conn.probeTimer = null
      if (this.topics.get(conn.topic) === conn && conn.transport === 'sse' && !conn.ws) this._dial(conn)
    }, delayMs)
  }

  /** A WebSocket tried while on SSE is live: it carries the topic from now on.
   * @param {TopicConnection} conn */
  _switchToSocket(conn) {
    clearTimeout(conn.probeTimer)
    conn.probeTimer = null
    conn.probeAttempt = 0
    this._closeStream(conn)
    conn.transport = 'websocket'
    this._setState(conn, 'open')
    this._emit('transport', { transport: 'websocket', previous: 'sse', reason: 'WebSocket works again' }, conn.topic)
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
      this._closeStream(conn)
      this._setState(conn, 'stopped')
      return
    }
    // A WebSocket tried while on SSE failed: the stream goes on; try again later.
    if (conn.transport === 'sse') return this._scheduleProbe(conn)
    // No close frame from the server and never subscribed: what a proxy that refuses (or cuts)
    // the upgrade looks like. Some in a row: use SSE.
    if (this._fallbackOn() && !conn.wsSubscribed && (code === CloseCode.ABNORMAL || !conn.wsOpened)) {
      conn.wsFailures += 1
      if (conn.wsFailures >= this.fallback.after) {
        this._failPendingSent(conn)
        this._emit('close', { code, reason, willReconnect: true, fallback: 'sse' }, conn.topic)
        return this._fallBack(conn, { code, reason: reason || `${conn.wsFailures} WebSockets failed before subscribing` })
      }
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
      if (entry.topic !== conn.topic || entry.via !== 'socket' || stillQueued.has(ref)) continue
      clearTimeout(entry.timer)
      this.pending.delete(ref)
      entry.reject(Object.assign(new Error('connection lost before ack'), { ref, outcomeUnknown: true }))
    }
  }

  /** The network came back (browser "online"): skip the remaining backoff of waiting topics. */
  _retryNow() {
    for (const conn of this.topics.values()) {
      if (conn.transport === 'sse' && conn.probeTimer) {
        clearTimeout(conn.probeTimer)
        conn.probeTimer = null
        this._dial(conn)
        continue
      }
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
    clearTimeout(conn.openTimer)
    clearTimeout(conn.probeTimer)
    conn.reconnectTimer = conn.heartbeatTimer = conn.deadlineTimer = conn.openTimer = conn.probeTimer = null
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

/** @param {string|undefined} url @returns {string} the server's base URL without trailing slash */
function serverBase(url) {
  let base = url
  if (!base) {
    if (typeof location === 'undefined') throw new Error('options.url is required outside a browser')
    base = location.origin
  }
  return base.replace(/\/+$/, '')
}

/** @param {string|undefined} url @returns {string} ws(s)://host[:port][/prefix] */
function wsBase(url) {
  return serverBase(url).replace(/^http(s?):\/\//i, 'ws$1://')
}

/** @param {string|undefined} url @returns {string} http(s)://host[:port][/prefix] */
function httpBase(url) {
  return serverBase(url).replace(/^ws(s?):\/\//i, 'http$1://')
}

/** A topic as a path segment; ':' stays readable (user:42), the ASGI server decodes it either way.
 * @param {string} topic @returns {string} */
function topicPath(topic) {
  return encodeURIComponent(topic).replace(/%3A/gi, ':')
}
