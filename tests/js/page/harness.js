// Test page harness: mounts small Vue apps that use static/notify/ as an application would, and
// exposes what a user would see (the rendered lists) to the test driver as window.harness.
// The server's base URL comes in the page URL (?api=http://127.0.0.1:PORT); tokens come from
// window.__notifyToken(), which the driver provides (as a Nuxt server route would).
import { createApp, defineComponent, effectScope, h, ref } from 'vue'

import { useNotifyTopic, useServerSentEvents } from '/static/notify/composables.js'
import { NotifySocketManager } from '/static/notify/socket.js'

const api = new URL(location.href).searchParams.get('api')
/** While held (holdTokens), token requests wait: nothing can reach the server. */
let tokenGate = null
const token = async () => {
  if (tokenGate) await tokenGate.promise
  return window.__notifyToken()
}

/** Every WebSocket / EventSource a mounted app opened, by app id, to check they were closed. */
const opened = {}
function tracked(Base, id) {
  return class extends Base {
    constructor(...args) {
      super(...args)
      ;(opened[id] ??= []).push(this)
    }
  }
}

const managers = {}
const logs = {}
const apps = {}
const callbacks = {}

function mountInto(id, component) {
  const el = document.createElement('section')
  el.id = id
  document.getElementById('apps').append(el)
  const app = createApp(component)
  app.mount(el)
  apps[id] = { app, el }
}

const TopicList = (id, topic) =>
  defineComponent({
    setup() {
      callbacks[id] = 0
      const t = useNotifyTopic(topic, {
        url: api,
        token,
        limit: 50,
        onNotification: () => {
          callbacks[id] += 1
        },
        socketOptions: { WebSocket: tracked(WebSocket, id), backoff: { baseMs: 100, maxMs: 1000 } },
      })
      return () =>
        h('div', [
          h('p', { class: 'state' }, t.state.value),
          h('p', { class: 'connected' }, String(t.connected.value)),
          h('p', { class: 'last-seq' }, String(t.lastSeq.value)),
          h(
            'ol',
            t.notifications.value.map((n) => h('li', { 'data-seq': n.seq }, `${n.event} ${JSON.stringify(n.data)}`)),
          ),
        ])
    },
  })

/** A topic list whose topic is a ref the test can switch. */
const topicRefs = {}
const SwitchableList = (id, initial) =>
  defineComponent({
    setup() {
      topicRefs[id] = ref(initial)
      const t = useNotifyTopic(topicRefs[id], {
        url: api,
        token,
        socketOptions: { WebSocket: tracked(WebSocket, id) },
      })
      return () =>
        h('div', [
          h('p', { class: 'connected' }, String(t.connected.value)),
          h('ol', t.notifications.value.map((n) => h('li', { 'data-seq': n.seq }, `${n.topic} ${n.event}`))),
        ])
    },
  })

const SseList = (id, url, events, lastEventId) =>
  defineComponent({
    setup() {
      callbacks[id] = 0
      const s = useServerSentEvents(url, {
        events,
        token,
        lastEventId,
        limit: 50,
        onEvent: () => {
          callbacks[id] += 1
        },
        backoff: { baseMs: 100, maxMs: 1000 },
        EventSource: tracked(EventSource, id),
      })
      return () =>
        h('div', [
          h('p', { class: 'state' }, s.state.value),
          h('p', { class: 'connected' }, String(s.connected.value)),
          h('p', { class: 'last-id' }, String(s.lastEventId.value)),
          h('p', { class: 'reset' }, JSON.stringify(s.reset.value?.data ?? null)),
          h(
            'ol',
            s.events.value.map((e) => h('li', { 'data-seq': e.data?.seq ?? e.id }, `${e.type} ${JSON.stringify(e.data?.data)}`)),
          ),
        ])
    },
  })

const domSeqs = (id) => {
  const el = document.getElementById(id)
  return el ? [...el.querySelectorAll('li')].map((li) => Number(li.dataset.seq)) : null
}

/** A topic list with `persist` (localStorage under its own key): cached items are marked. */
const persisted = {}
const PersistedList = (id, topic) =>
  defineComponent({
    setup() {
      const t = useNotifyTopic(topic, {
        url: api,
        token,
        persist: true,
        persistKey: `notify-test:${id}`,
        socketOptions: { WebSocket: tracked(WebSocket, id), backoff: { baseMs: 100, maxMs: 1000 } },
      })
      persisted[id] = t
      return () =>
        h('div', [
          h('p', { class: 'state' }, t.state.value),
          h('p', { class: 'connected' }, String(t.connected.value)),
          h('p', { class: 'cached' }, String(t.cached.value)),
          h(
            'ol',
            t.notifications.value.map((n) => h('li', { 'data-seq': n.seq, 'data-cached': String(!!n.cached) }, n.event)),
          ),
        ])
    },
  })

/** Composables used outside any component (as from a store or plugin), by id. */
const detached = {}

window.harness = {
  /** useNotifyTopic outside a component: connects at once, runs until stop(). */
  startDetached(id, topic) {
    detached[id] = useNotifyTopic(topic, {
      url: api,
      token,
      socketOptions: { WebSocket: tracked(WebSocket, id) },
    })
    return true
  },
  detached: (id) => ({
    connected: detached[id].connected.value,
    state: detached[id].state.value,
    seqs: detached[id].notifications.value.map((n) => n.seq),
  }),
  stopDetached(id) {
    detached[id].stop()
    return true
  },
  /** The same inside an effectScope: disposing the scope closes it. */
  startInScope(id, topic) {
    const scope = effectScope()
    scope.run(() => {
      detached[id] = useNotifyTopic(topic, { url: api, token, socketOptions: { WebSocket: tracked(WebSocket, id) } })
    })
    detached[id].scope = scope
    return true
  },
  disposeScope(id) {
    detached[id].scope.stop()
    return true
  },
  /** A bare manager (no Vue) following `topic`; its log records what it delivered. */
  startManager(name, topic, since = null) {
    // WebSocket only: these tests count the socket's own subscriptions across a server restart.
    const m = new NotifySocketManager({ url: api, token, backoff: { baseMs: 100, maxMs: 1000 }, fallback: false })
    const log = { seqs: [], states: [], errors: [], resets: [], closes: [], subscribed: 0 }
    m.on('notification', (n) => log.seqs.push(n.seq))
    m.on('subscribed', () => {
      log.subscribed += 1
    })
    m.on('state', (s) => log.states.push(s.state))
    m.on('error', (e) => log.errors.push({ code: e.code, fatal: !!e.fatal }))
    m.on('reset', (r) => log.resets.push(r))
    m.on('close', (c) => log.closes.push(c.code))
    m.connect(topic, { since })
    managers[name] = m
    logs[name] = log
    return true
  },
  /**
   * A bare manager with a quick SSE fallback (two failed sockets, WebSocket retried after
   * 0.3-1 s): its log records seqs, transports, acks and publish errors.
   */
  startFallback(name, topic) {
    const m = new NotifySocketManager({
      url: api,
      token,
      backoff: { baseMs: 100, maxMs: 500 },
      fallback: { after: 2, retry: { baseMs: 300, maxMs: 1000 } },
      WebSocket: tracked(WebSocket, `${name}-ws`),
      EventSource: tracked(EventSource, `${name}-sse`),
    })
    const log = { seqs: [], transports: [], acks: [], errors: [], subscribed: 0 }
    m.on('notification', (n) => log.seqs.push(n.seq))
    m.on('subscribed', () => {
      log.subscribed += 1
    })
    m.on('transport', (t) => log.transports.push(t.transport))
    m.on('error', (e) => log.errors.push(e.code))
    m.connect(topic)
    managers[name] = m
    logs[name] = log
    return true
  },
  /** Publish through manager `name`; the ack (or the error's code) lands in its log. */
  publish(name, event, data) {
    const m = managers[name]
    m.publish([...m.topics.keys()][0], event, data).then(
      (ack) => logs[name].acks.push(ack),
      (err) => logs[name].acks.push({ error: err.code ?? err.message }),
    )
    return true
  },
  transport: (name) => managers[name].transport([...managers[name].topics.keys()][0]),
  holdTokens() {
    let release
    const promise = new Promise((resolve) => {
      release = resolve
    })
    tokenGate = { promise, release }
    return true
  },
  releaseTokens() {
    tokenGate?.release()
    tokenGate = null
    return true
  },
  /**
   * Mount a persisted list and report, in the same turn (before any network event could be
   * handled), what the composable holds and how many sockets were opened.
   */
  mountPersisted(id, topic) {
    mountInto(id, PersistedList(id, topic))
    const t = persisted[id]
    return {
      seqs: t.notifications.value.map((n) => n.seq),
      cached: t.notifications.value.map((n) => !!n.cached),
      flag: t.cached.value,
      sockets: (opened[id] ?? []).length,
    }
  },
  /** The `data-cached` marks the app at `id` renders, in display order. */
  cachedMarks: (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.dataset.cached === 'true'),
  cachedText: (id) => document.querySelector(`#${id} .cached`)?.textContent ?? null,
  managerLog: (name) => ({ ...logs[name], state: managers[name].state([...managers[name].topics.keys()][0]) }),
  stopManager(name) {
    managers[name].close()
    return true
  },
  mountTopic(id, topic) {
    mountInto(id, TopicList(id, topic))
    return true
  },
  mountSse(id, topic, events, lastEventId = null) {
    mountInto(id, SseList(id, `${api}/events/${topic}/`, events, lastEventId))
    return true
  },
  mountSwitchable(id, topic) {
    mountInto(id, SwitchableList(id, topic))
    return true
  },
  switchTopic(id, topic) {
    topicRefs[id].value = topic
    return true
  },
  /** "<topic> <event>" of every notification the app at `id` shows. */
  texts: (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.textContent),
  unmount(id) {
    apps[id].app.unmount()
    apps[id].el.remove()
    delete apps[id]
    return true
  },
  /** The seqs the app at `id` shows, in display order (null when not mounted). */
  seqs: domSeqs,
  stateText: (id) => document.querySelector(`#${id} .state`)?.textContent ?? null,
  /** The reset notice the SSE app at `id` shows (null: none). */
  resetShown: (id) => JSON.parse(document.querySelector(`#${id} .reset`)?.textContent ?? 'null'),
  connectedText: (id) => document.querySelector(`#${id} .connected`)?.textContent ?? null,
  /** readyState of every WebSocket/EventSource the app at `id` opened. */
  readyStates: (id) => (opened[id] ?? []).map((s) => s.readyState),
  /** How many times the app's notification callback ran (it must stop after unmount). */
  callbacks: (id) => callbacks[id],
}
window.harnessReady = true
