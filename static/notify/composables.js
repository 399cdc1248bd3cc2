/**
 * Vue / Nuxt composables over notify's realtime edge: `useNotifyTopic` (plain WebSocket, through
 * NotifySocketManager) and `useServerSentEvents` (SSE at /events/<topic>/, through
 * NotifyEventStream).
 *
 * Works in Nuxt 4 and Nuxt 3 and in a plain page with an import map for "vue". In Nuxt, copy this
 * folder's .js files into `app/lib/notify/` (Nuxt 3: `lib/notify/`) and re-export the composables
 * from `app/composables/notify.js`: Nuxt auto-imports only the top level of `composables/`, so a
 * folder copied there builds and then fails with "useNotifyTopic is not defined". See
 * docs/js-client.md.
 *
 * Lifecycle: inside a component's setup() the connection opens on mount and closes on unmount (so
 * nothing connects during server-side rendering); inside another effect scope (a Pinia store,
 * `effectScope()`) it opens at once and closes when the scope is disposed; anywhere else it opens
 * at once and the caller must call the returned `stop()`.
 *
 * @module notify/composables
 */

import {
  getCurrentInstance,
  getCurrentScope,
  isRef,
  onMounted,
  onScopeDispose,
  onUnmounted,
  readonly,
  ref,
  shallowRef,
  watch,
} from 'vue'

import { NotifySocketManager } from './socket.js'
import { NotifyEventStream } from './sse.js'

/**
 * Run `start` now or on mount, and `stop` on unmount / scope disposal, per the rules above.
 * @param {() => void} start
 * @param {() => void} stop
 */
function bindLifecycle(start, stop) {
  if (getCurrentInstance()) {
    onMounted(start)
    onUnmounted(stop)
    return
  }
  if (getCurrentScope()) onScopeDispose(stop)
  start()
}

/** @param {any} source @returns {any} the plain value of a ref, getter or value */
function valueOf(source) {
  if (isRef(source)) return source.value
  if (typeof source === 'function') return source()
  return source
}

/**
 * Append `item` to a bounded list (oldest first), returning a new array so a shallowRef triggers.
 * @template T @param {T[]} list @param {T} item @param {number} limit @returns {T[]}
 */
function appendBounded(list, item, limit) {
  const next = list.length >= limit ? list.slice(list.length - limit + 1) : list.slice()
  next.push(item)
  return next
}

/**
 * @typedef {object} NotifyTopicOptions
 * @property {NotifySocketManager} [manager]  a shared manager (left open on stop); default: a
 *   manager of our own built from the options below, closed on stop
 * @property {string} [url]  server base URL (Nuxt: `useRuntimeConfig().public.notifyUrl`)
 * @property {string|(() => (string|Promise<string>))} [token]  token or token provider
 * @property {number|null} [since]  resume after this seq (e.g. persisted by the app)
 * @property {number} [limit=100]  notifications kept in `notifications` (oldest dropped first)
 * @property {(n: object) => void} [onNotification]  called for every new notification (not for
 *   those restored by `persist`)
 * @property {boolean|import('./persist.js').StorageAdapter} [persist=false]  keep the topic's last
 *   notifications and seq across page loads (true: localStorage, or a storage adapter); the next
 *   load shows them at once, each with `cached: true`, and resumes after their seq
 * @property {number} [persistLimit=50]  notifications kept by `persist`
 * @property {string} [persistKey]  prefix of the storage keys (see NotifySocketManager)
 * @property {boolean|import('./socket.js').FallbackOptions} [fallback=true]  fall back to SSE
 *   where WebSockets cannot be used (see NotifySocketManager)
 * @property {object} [socketOptions]  extra NotifySocketManager options (backoff, heartbeat...)
 */

/**
 * Subscribe to one topic over the plain WebSocket protocol.
 *
 * `topic` may be a string, a ref or a getter: when it changes, the old topic is left and the list
 * starts again for the new one.
 *
 * `transport` says what delivers the topic now ('sse' while on the fallback); `cached` is true
 * while the list shows only what `persist` kept from an earlier visit (until the server answered).
 *
 * @param {string|import('vue').Ref<string>|(() => string)} topic
 * @param {NotifyTopicOptions} [options]
 * @returns {{
 *   notifications: import('vue').ShallowRef<object[]>,
 *   lastSeq: import('vue').Ref<number|null>,
 *   connected: import('vue').Ref<boolean>,
 *   state: import('vue').Ref<string>,
 *   error: import('vue').ShallowRef<object|null>,
 *   reset: import('vue').ShallowRef<object|null>,
 *   transport: import('vue').Ref<'websocket'|'sse'>,
 *   cached: import('vue').Ref<boolean>,
 *   publish: (event: string, data: any, extra?: {severity?: string}) => Promise<object>,
 *   send: (frame: object) => boolean,
 *   clear: () => void,
 *   stop: () => void,
 *   manager: NotifySocketManager,
 * }}
 */
export function useNotifyTopic(topic, options = {}) {
  const limit = options.limit ?? 100
  const notifications = shallowRef([])
  const lastSeq = ref(options.since ?? null)
  const connected = ref(false)
  const state = ref('idle')
  const error = shallowRef(null)
  const reset = shallowRef(null)
  const transport = ref('websocket')
  const cached = ref(false)

  const ownManager = !options.manager
  const manager =
    options.manager ??
    new NotifySocketManager({
      url: options.url,
      token: options.token,
      ...(options.persist !== undefined ? { persist: options.persist } : {}),
      ...(options.persistLimit !== undefined ? { persistLimit: options.persistLimit } : {}),
      ...(options.persistKey !== undefined ? { persistKey: options.persistKey } : {}),
      ...(options.fallback !== undefined ? { fallback: options.fallback } : {}),
      ...(options.socketOptions ?? {}),
    })

  /** @type {string|null} */
  let current = null
  /** @type {(() => void)[]} */
  let unlisten = []
  /** @type {(() => void)|null} */
  let release = null
  let stopped = false
  /** @type {(() => void)|null} */
  let stopWatch = null

  /** Listen only to our topic's events. */
  function listen(event, handler) {
    unlisten.push(manager.on(event, (payload, t) => t === current && handler(payload)))
  }

  /** Show what `persist` restored (only while nothing newer is shown). @param {object[]} items */
  function showCached(items) {
    if (!items.length || notifications.value.length) return
    notifications.value = items.slice(-limit)
    lastSeq.value = items[items.length - 1].seq ?? lastSeq.value
    cached.value = true
  }

  function open(name) {
    current = name
    // Before acquire: a synchronous storage restores during connect().
    listen('cached', ({ notifications: items }) => showCached(items))
    listen('transport', ({ transport: t }) => {
      transport.value = t
    })
    listen('notification', (n) => {
      notifications.value = appendBounded(notifications.value, n, limit)
      lastSeq.value = n.seq ?? lastSeq.value
      options.onNotification?.(n)
    })
    listen('subscribed', (frame) => {
      connected.value = true
      cached.value = false
      error.value = null
      if (lastSeq.value == null) lastSeq.value = frame.last_seq ?? null
    })
    listen('reset', (frame) => {
      reset.value = frame
      lastSeq.value = manager.lastSeq(name)
    })
    listen('state', ({ state: s }) => {
      state.value = s
      if (s !== 'open') connected.value = false
    })
    listen('error', (e) => {
      error.value = e
    })
    // Resume where this composable's list ends, if the topic is the same as before.
    release = manager.acquire(name, { since: lastSeq.value })
    // A shared manager may already be live on this topic: its "subscribed" will not come again.
    state.value = manager.state(name)
    connected.value = state.value === 'open'
    transport.value = manager.transport(name)
    showCached(manager.cached(name))
  }

  function leave() {
    for (const off of unlisten) off()
    unlisten = []
    release?.()
    release = null
    current = null
    connected.value = false
  }

  function start() {
    if (stopped) return
    if (isRef(topic) || typeof topic === 'function') {
      stopWatch = watch(
        () => valueOf(topic),
        (name, previous) => {
          if (name === previous && current) return
          leave()
          if (previous !== undefined) {
            notifications.value = []
            lastSeq.value = null
            reset.value = null
            cached.value = false
          }
          if (name) open(name)
        },
        { immediate: true },
      )
    } else {
      open(topic)
    }
  }

  function stop() {
    if (stopped) return
    stopped = true
    stopWatch?.()
    leave()
    state.value = 'closed'
    if (ownManager) manager.close()
  }

  bindLifecycle(start, stop)

  return {
    notifications,
    lastSeq,
    connected: readonly(connected),
    state: readonly(state),
    error,
    reset,
    transport: readonly(transport),
    cached: readonly(cached),
    publish: (event, data, extra) =>
      current ? manager.publish(current, event, data, extra) : Promise.reject(new Error('not connected')),
    send: (frame) => (current ? manager.send(current, frame) : false),
    clear: () => {
      notifications.value = []
    },
    stop,
    manager,
  }
}

/**
 * @typedef {object} SseOptions
 * @property {string[]} [events]  named event types to listen to (our SSE event name is the
 *   notification's `event`, e.g. "pod.crash"; EventSource only delivers named events to listeners
 *   registered for that name). "message" (unnamed events) is always listened to.
 * @property {number} [limit=100]  events kept in `events` (oldest dropped first)
 * @property {boolean} [withCredentials=false]  send cookies cross-origin (session auth)
 * @property {string|(() => (string|Promise<string>))} [token]  token or provider, sent as
 *   `?token=` (EventSource cannot send headers); fetched again for every manual reconnect
 * @property {string|null} [lastEventId]  resume after this id on the first connection
 * @property {import('./reconnect.js').BackoffOptions} [backoff]  delays of manual reconnects
 * @property {(e: {type: string, id: string, data: any}) => void} [onEvent]
 * @property {typeof EventSource} [EventSource]  implementation (default: the global one)
 */

/**
 * Follow a Server-Sent Events stream with resume: a Vue wrapper over NotifyEventStream (sse.js),
 * which holds the rules (browser reconnects with `Last-Event-ID`; after the browser gives up, our
 * own reconnect with a fresh token and `lastEventId`; seqs already seen skipped).
 *
 * `connected` is true once the server said `subscribed` (the replay is over, the stream is live),
 * as `useNotifyTopic`'s is. `url` may be a string, a ref or a getter: when it changes, the list
 * starts again for the new stream.
 *
 * @param {string|import('vue').Ref<string>|(() => string)} url  absolute or page-relative URL
 * @param {SseOptions} [options]
 * @returns {{
 *   events: import('vue').ShallowRef<{type: string, id: string, data: any}[]>,
 *   lastEventId: import('vue').Ref<string|null>,
 *   connected: import('vue').Ref<boolean>,
 *   state: import('vue').Ref<'idle'|'connecting'|'open'|'reconnecting'|'closed'>,
 *   error: import('vue').ShallowRef<any>,
 *   reset: import('vue').ShallowRef<any>,
 *   reconnect: () => Promise<void>,
 *   clear: () => void,
 *   stop: () => void,
 * }}
 */
export function useServerSentEvents(url, options = {}) {
  const limit = options.limit ?? 100
  const events = shallowRef([])
  const lastEventId = ref(options.lastEventId ?? null)
  const connected = ref(false)
  const state = ref('idle')
  const error = shallowRef(null)
  const reset = shallowRef(null)

  /** @type {NotifyEventStream|null} */
  let stream = null
  /** @type {(() => void)[]} */
  let unlisten = []
  let stopped = false

  /** Follow `target`, resuming after `resumeAfter`; the previous stream (if any) is dropped. */
  function follow(target, resumeAfter) {
    leave()
    const s = new NotifyEventStream(target, {
      events: options.events,
      withCredentials: options.withCredentials,
      token: options.token,
      lastEventId: resumeAfter,
      backoff: options.backoff,
      EventSource: options.EventSource,
    })
    const listen = (event, handler) => unlisten.push(s.on(event, handler))
    listen('event', (item) => {
      events.value = appendBounded(events.value, item, limit)
      lastEventId.value = s.lastEventId
      options.onEvent?.(item)
    })
    listen('subscribed', () => {
      connected.value = true
    })
    listen('reset', (item) => {
      lastEventId.value = s.lastEventId
      reset.value = item
    })
    listen('open', () => {
      error.value = null
    })
    listen('state', ({ state: next }) => {
      state.value = next
      connected.value = s.connected
    })
    listen('error', (e) => {
      connected.value = s.connected
      error.value = e
    })
    stream = s
    s.open()
  }

  function leave() {
    for (const off of unlisten) off()
    unlisten = []
    stream?.close()
    stream = null
  }

  let stopWatch = null
  function start() {
    if (stopped) return
    if (isRef(url) || typeof url === 'function') {
      stopWatch = watch(
        () => valueOf(url),
        (next, previous) => {
          if (previous !== undefined) {
            // Another stream: its ids mean nothing for the old one.
            events.value = []
            lastEventId.value = null
            reset.value = null
          }
          follow(next, lastEventId.value)
        },
        { immediate: true },
      )
    } else {
      follow(url, lastEventId.value)
    }
  }

  function stop() {
    if (stopped) return
    stopped = true
    stopWatch?.()
    leave()
    connected.value = false
    state.value = 'closed'
  }

  bindLifecycle(start, stop)

  return {
    events,
    lastEventId,
    connected: readonly(connected),
    state: readonly(state),
    error,
    reset,
    reconnect: () => (stream ? stream.reconnect() : Promise.resolve()),
    clear: () => {
      events.value = []
    },
    stop,
  }
}
