/**
 * notify's service worker: shows each Web Push message as a notification and opens its URL on a
 * click. Serve it from the page's origin, at the root (`/notify-sw.js`) so that its scope covers
 * the app; docs/js-client.md, "Web Push", says how.
 *
 * A push message is the JSON the server's push transport sends:
 * `{title, body, url, topic, seq, id, event, severity}` (routing_app/delivery/transports/push.py).
 * Notifications of one topic replace each other (`tag`), the newest shown; `critical` and `error`
 * ones stay until the user acts (`requireInteraction`).
 *
 * Plain classic worker script (no imports), so that every browser can register it.
 */

const FALLBACK_TITLE = 'notify'

/** The notification to show for a push event's data. */
function notificationOf(data) {
  let message = {}
  if (data) {
    try {
      message = data.json()
    } catch {
      message = { body: data.text() }
    }
  }
  const title = typeof message.title === 'string' && message.title ? message.title : FALLBACK_TITLE
  return {
    title,
    options: {
      body: typeof message.body === 'string' ? message.body : '',
      tag: typeof message.topic === 'string' ? `notify:${message.topic}` : undefined,
      renotify: typeof message.topic === 'string',
      requireInteraction: message.severity === 'critical' || message.severity === 'error',
      timestamp: Date.now(),
      data: {
        url: typeof message.url === 'string' && message.url ? message.url : '/',
        topic: message.topic,
        seq: message.seq,
        id: message.id,
        event: message.event,
      },
    },
  }
}

self.addEventListener('install', () => {
  self.skipWaiting()
})

self.addEventListener('activate', (event) => {
  event.waitUntil(self.clients.claim())
})

self.addEventListener('push', (event) => {
  const { title, options } = notificationOf(event.data)
  event.waitUntil(self.registration.showNotification(title, options))
})

self.addEventListener('notificationclick', (event) => {
  event.notification.close()
  const target = new URL(event.notification.data?.url ?? '/', self.location.origin).href
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true })
      const open = windows.find((client) => client.url === target)
      if (open) return open.focus()
      return self.clients.openWindow(target)
    })(),
  )
})
