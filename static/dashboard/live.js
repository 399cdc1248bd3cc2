/**
 * The dashboard pages' live connection: one `NotifyEventStream` (static/notify/sse.js) on a
 * staff-only topic, authenticated by the page's session cookie (same origin, so no token), and
 * the header's badge showing whether the stream is live.
 *
 * @module dashboard/live
 */

import { NotifyEventStream } from '../notify/sse.js'

/** @param {string} state  'live' | 'connecting' | 'offline' */
function badge(state) {
  const el = document.getElementById('live')
  if (!el) return
  el.dataset.state = state
  el.textContent = state
}

/**
 * Follow `url` (`/events/<topic>/`) and call `onEvent({type, id, data})` for each event named in
 * `events` (notifications once each, in seq order; ephemeral events as they come).
 * @param {string} url
 * @param {string[]} events
 * @param {(event: {type: string, id: string|null, data: any}) => void} onEvent
 * @param {{lastEventId?: string|null}} [options]
 * @returns {NotifyEventStream}
 */
export function follow(url, events, onEvent, options = {}) {
  const stream = new NotifyEventStream(url, { events, lastEventId: options.lastEventId ?? null })
  stream.on('subscribed', () => badge('live'))
  stream.on('state', ({ state }) => {
    if (state === 'closed') badge('offline')
    else if (!stream.connected) badge('connecting')
  })
  stream.on('event', onEvent)
  stream.open()
  return stream
}
