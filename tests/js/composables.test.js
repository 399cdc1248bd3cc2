// Node tests of static/notify/composables.js: server-side rendering opens nothing, and the
// composables' own cleanup outside components. Run: node --test tests/js/composables.test.js
import assert from 'node:assert/strict'
import { register } from 'node:module'
import { test } from 'node:test'

register('./resolve-vue.js', import.meta.url)
const { createSSRApp, defineComponent, effectScope, h, nextTick } = await import('vue')
const { renderToString } = await import('vue/server-renderer')
const { useNotifyTopic, useServerSentEvents } = await import('../../static/notify/composables.js')

/** Stand-ins that record construction: SSR must construct neither. */
const opened = []
class RecordingWebSocket {
  constructor(url) {
    opened.push(['ws', url])
    this.readyState = 0
  }
  close() {
    this.readyState = 3
  }
  send() {}
}
class RecordingEventSource {
  constructor(url) {
    opened.push(['sse', url])
    this.readyState = 0
  }
  addEventListener() {}
  removeEventListener() {}
  close() {
    this.readyState = 2
  }
}

test('server-side rendering opens no socket and no event stream', async () => {
  opened.length = 0
  const app = createSSRApp(
    defineComponent({
      setup() {
        const t = useNotifyTopic('alerts.k8s', {
          url: 'http://notify.test',
          token: 'tok',
          socketOptions: { WebSocket: RecordingWebSocket },
        })
        const s = useServerSentEvents('http://notify.test/events/alerts.k8s/', {
          EventSource: RecordingEventSource,
        })
        return () => h('p', `${t.state.value} ${t.notifications.value.length} ${s.state.value}`)
      },
    }),
  )
  assert.equal(await renderToString(app), '<p>idle 0 idle</p>')
  assert.deepEqual(opened, [])
})

test('inside an effect scope both connect at once and close when the scope is disposed', async () => {
  opened.length = 0
  const scope = effectScope()
  let t
  let s
  scope.run(() => {
    t = useNotifyTopic('alerts.k8s', {
      url: 'http://notify.test',
      socketOptions: { WebSocket: RecordingWebSocket },
    })
    s = useServerSentEvents('http://notify.test/events/alerts.k8s/', {
      events: ['pod.crash'],
      lastEventId: '7',
      EventSource: RecordingEventSource,
    })
  })
  await nextTick()
  await new Promise((resolve) => setImmediate(resolve)) // the token step is async
  assert.deepEqual(opened.sort(), [
    ['sse', 'http://notify.test/events/alerts.k8s/?lastEventId=7'],
    ['ws', 'ws://notify.test/ws/alerts.k8s/'],
  ])
  scope.stop()
  assert.equal(t.state.value, 'closed')
  assert.equal(s.state.value, 'closed')
  assert.equal(t.manager.topics.size, 0)
})
