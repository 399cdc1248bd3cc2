/**
 * Client for notify's Server-Sent Events at `/events/<topic>/`: `NotifyEventStream`, an
 * EventSource with a token provider, reconnect with backoff, resume and de-duplication.
 *
 * Protocol: the docstring at the top of channels_app/sse.py, and the README's "Server-Sent
 * Events". Plain ES module, no build step, no framework: works in browsers, in Nuxt (client side)
 * and wherever an EventSource implementation can be passed in. The Vue composable
 * `useServerSentEvents` (composables.js) is a thin wrapper over this class.
 *
 * Guarantees this module gives the application, per stream:
 * - while the browser reconnects by itself (network drop, server restart, `stream-error` with
 *   `retry`) it sends `Last-Event-ID` on its own; when the browser gives up (an HTTP refusal such
 *   as 401 for an expired token: the EventSource goes to CLOSED), we open a new one after a
 *   backoff with full jitter, with a fresh token from the provider and the last id as the
 *   `lastEventId` query parameter (a new EventSource cannot send headers);
 * - a notification's seq (its event id) is delivered once: a replay overlapping what we had is
 *   dropped, with the same rule as the WebSocket manager (`admitSeq` in reconnect.js);
 * - `connected` is true only once the server said `subscribed` (the replay is over and the stream
 *   is live), not merely when the HTTP response started;
 * - a `reset` (what we missed is gone) is reported, and its id becomes our position, so a later
 *   resume does not ask for the lost range again;
 * - nothing reconnects after `close()`.
 *
 * @module notify/sse
 */

import { admitSeq, backoffDelay, seqOfEventId } from './reconnect.js'

const EVENTSOURCE_CLOSED = 2 // EventSource.CLOSED, spelled out so no global is needed at import time

/**
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} StreamState
 *  - connecting: fetching the token and opening the EventSource; open: the HTTP stream is open
 *    (live once `subscribed` arrived, see `connected`); reconnecting: the browser is retrying by
 *    itself, or we wait for the backoff delay; closed: closed on purpose by `close()`.
 */

/**
 * @typedef {object} NotifyEventStreamOptions
 * @property {string[]} [events]  named event types to listen to (our SSE event name is the
 *   notification's `event`, e.g. "pod.crash"; EventSource only delivers named events to listeners
 *   registered for that name). "message" (unnamed events) is always listened to.
 * @property {boolean} [withCredentials=false]  send cookies cross-origin (session auth)
 * @property {string|null|(() => (string|null|Promise<string|null>))} [token]  token, or a
 *   function returning one, sent as `?token=` (EventSource cannot send headers); a function is
 *   called again for every connection we open ourselves, so an expired token is replaced
 * @property {string|null} [lastEventId]  resume after this id (a seq) on the first connection
 * @property {import('./reconnect.js').BackoffOptions} [backoff]  delays of our own reconnects
 * @property {typeof EventSource} [EventSource]  implementation (default: the global one)
 */

/**
 * @typedef {{type: string, id: string|null, data: any}} StreamEvent
 *  `type` is the SSE event name, `id` its id (the seq for notifications), `data` the parsed JSON
 *  (for a notification: the envelope {type, topic, seq, id, event, data, severity, source, ts})
 *  or the text when it is not JSON.
 */

/**
 * One Server-Sent Events stream, e.g. `new NotifyEventStream(`${base}/events/alerts.k8s/`, {...})`.
 * Nothing connects before `open()`. Listen with `on(event, handler)`; handlers get one payload.
 *
 * Events: "event" (a StreamEvent, each notification once), "subscribed" (the server's
 * {type, topic, last_seq}: live from here), "reset" (a StreamEvent whose data is
 * {type, topic, since, oldest_seq, last_seq}: reload your state), "open" (the HTTP stream
 * started), "state" ({state, previous}), "reconnect" ({attempt, delayMs}: we open a new
 * EventSource after delayMs), "error" (what went wrong: the token provider's Error, the
 * EventSource's error Event when the browser gave up, or {type: "stream-error", data} with the
 * server's text just before it ended the stream; the stream recovers from all three by itself).
 */
export class NotifyEventStream {
  /**
   * @param {string|(() => string)} url  absolute or page-relative URL of `/events/<topic>/`, or a
   *   function returning it (read at every connection)
   * @param {NotifyEventStreamOptions} [options]
   */
  constructor(url, options = {}) {
    this.url = url
    this.options = { backoff: {}, ...options }
    /** @type {StreamState} */
    this.state = 'idle'
    /** True once the server said `subscribed`, until the stream drops. */
    this.connected = false
    /** Id of the last event delivered (the resume point), or null. @type {string|null} */
    this.lastEventId = options.lastEventId ?? null
    /** Seq of `lastEventId`, the de-duplication position. @type {number|null} */
    this.lastSeq = seqOfEventId(this.lastEventId)
    /** Consecutive times the browser gave up since the last open stream. */
    this.attempt = 0
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map()
    /** @type {EventSource|null} */
    this.source = null
    /** @type {[string, EventListener][]} */
    this._attached = []
    this._retryTimer = null
    this._closed = false
    // Bumped by every connect and by close(): a token that arrives late belongs to no one.
    this._generation = 0
  }

  // --- events -------------------------------------------------------------------------------

  /**
   * Register `handler` for `event`; returns a function that removes it.
   * @param {string} event
   * @param {(payload: any) => void} handler
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

  /** @param {string} event @param {any} payload */
  _emit(event, payload) {
    const set = this.listeners.get(event)
    if (!set) return
    // Copy: a handler may call off() while we iterate.
    for (const handler of [...set]) {
      try {
        handler(payload)
      } catch (err) {
        // One broken handler must not stop delivery to the others nor kill the stream.
        queueMicrotask(() => {
          throw err
        })
      }
    }
  }

  // --- lifecycle ----------------------------------------------------------------------------

  /**
   * Start following the stream (once; later calls do nothing while it runs).
   * @returns {NotifyEventStream}
   */
  open() {
    if (this.state === 'idle') this._connect()
    return this
  }

  /**
   * Open a new EventSource now (fresh token, resuming after `lastEventId`), forgetting past
   * failures. Does nothing after `close()`.
   * @returns {Promise<void>} settles once the EventSource is created (or the attempt failed)
   */
  reconnect() {
    this.attempt = 0
    return this._connect()
  }

  /** Close the stream for good: no reconnect. */
  close() {
    if (this._closed) return
    this._closed = true
    this._generation += 1
    clearTimeout(this._retryTimer)
    this._retryTimer = null
    this._detach()
    this.connected = false
    this._setState('closed')
  }

  /**
   * The URL of one connection attempt: `url` with `?token=` and `?lastEventId=` when known.
   * @param {string|null} token
   * @returns {string}
   */
  streamUrl(token) {
    const raw = typeof this.url === 'function' ? this.url() : this.url
    const target = new URL(raw, globalThis.location?.href)
    if (token) target.searchParams.set('token', token)
    // The header only goes out on the browser's own reconnects; a new EventSource needs the query.
    if (this.lastEventId) target.searchParams.set('lastEventId', this.lastEventId)
    return target.toString()
  }

  // --- connection machinery -----------------------------------------------------------------

  async _connect() {
    clearTimeout(this._retryTimer)
    this._retryTimer = null
    this._detach()
    if (this._closed) return
    const mine = ++this._generation
    this._setState('connecting')
    let token = null
    try {
      const t = this.options.token
      token = typeof t === 'function' ? await t() : (t ?? null)
    } catch (err) {
      if (mine !== this._generation || this._closed) return
      this._emit('error', err)
      this._scheduleRetry()
      return
    }
    if (mine !== this._generation || this._closed) return // close() or another connect meanwhile
    const Impl = this.options.EventSource ?? globalThis.EventSource
    const es = new Impl(this.streamUrl(token), { withCredentials: !!this.options.withCredentials })
    this.source = es
    const types = new Set(['message', ...(this.options.events ?? [])])
    types.delete('subscribed') // always listened to, below
    for (const type of types) this._listen(es, type, (ev) => this._received(ev))
    this._listen(es, 'subscribed', (ev) => this._subscribed(ev))
    // "What you missed is gone" (ours: `reset`, django-eventstream's: `stream-reset`).
    for (const type of ['reset', 'stream-reset']) this._listen(es, type, (ev) => this._reset(ev))
    this._listen(es, 'stream-error', (ev) => this._emit('error', { type: ev.type, data: ev.data }))
    es.onopen = () => {
      if (this.source !== es) return
      this.attempt = 0
      this._setState('open')
      this._emit('open', {})
    }
    es.onerror = (ev) => {
      if (this.source !== es) return
      this.connected = false
      if (es.readyState === EVENTSOURCE_CLOSED) {
        // The browser gave up (an HTTP refusal, e.g. an expired token): only a new EventSource,
        // with a fresh token, can go on.
        this._emit('error', ev)
        this._scheduleRetry()
      } else {
        this._setState('reconnecting') // the browser retries itself, with Last-Event-ID
      }
    }
  }

  /** @param {EventSource} es @param {string} type @param {(ev: MessageEvent) => void} fn */
  _listen(es, type, fn) {
    const guarded = (ev) => this.source === es && fn(ev)
    es.addEventListener(type, guarded)
    this._attached.push([type, guarded])
  }

  _detach() {
    const es = this.source
    if (!es) return
    for (const [type, fn] of this._attached) es.removeEventListener(type, fn)
    this._attached = []
    es.onopen = es.onerror = null
    es.close()
    this.source = null
  }

  _scheduleRetry() {
    this._detach()
    if (this._closed) return
    this.connected = false
    this._setState('reconnecting')
    const delayMs = backoffDelay(this.attempt, this.options.backoff)
    this.attempt += 1
    this._emit('reconnect', { attempt: this.attempt, delayMs })
    this._retryTimer = setTimeout(() => this._connect(), delayMs)
  }

  /** @param {MessageEvent} ev */
  _received(ev) {
    const data = parseData(ev.data)
    // Ephemeral topic events carry no id; EventSource still reports the last id it saw (the
    // previous notification's), which is not theirs: they are neither duplicates nor a position.
    if (data?.type !== 'event') {
      const verdict = admitSeq(this.lastSeq, seqOfEventId(ev.lastEventId))
      if (!verdict.deliver) return // already delivered: replay overlap
      this.lastSeq = verdict.lastSeq
      if (ev.lastEventId) this.lastEventId = ev.lastEventId
    }
    // No `gap` here, unlike the socket: listening to some event names only skips seqs on purpose.
    this._emit('event', { type: ev.type, id: ev.lastEventId || null, data })
  }

  /** @param {MessageEvent} ev */
  _subscribed(ev) {
    this.connected = true
    this._emit('subscribed', parseData(ev.data))
    // Listed in `events` too: delivered as before, through the same rule.
    if (this.options.events?.includes('subscribed')) this._received(ev)
  }

  /** Its id is where the stream goes on from; the browser adopts it as Last-Event-ID, and so do
   * we, so a reconnect of ours does not ask for the lost range again. @param {MessageEvent} ev */
  _reset(ev) {
    const n = seqOfEventId(ev.lastEventId)
    if (n != null && (this.lastSeq == null || n > this.lastSeq)) {
      this.lastSeq = n
      this.lastEventId = ev.lastEventId
    }
    this._emit('reset', { type: ev.type, id: ev.lastEventId || null, data: parseData(ev.data) })
  }

  /** @param {StreamState} state */
  _setState(state) {
    if (this.state === state) return
    const previous = this.state
    this.state = state
    if (state !== 'open') this.connected = false
    this._emit('state', { state, previous })
  }
}

/** @param {string} text @returns {any} the parsed JSON, or the text when it is not JSON */
function parseData(text) {
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}
