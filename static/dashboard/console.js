/**
 * The topics page's live console: the chosen topic's notifications over SSE with
 * `NotifyEventStream` (resumes from its last seq with Last-Event-ID like any client, each seq
 * shown once), and a form that stores a test notification through the dashboard's view.
 *
 * @module dashboard/console
 */

import { follow } from './live.js'

const KEEP = 200 // lines kept in the log

function line(envelope) {
  const li = document.createElement('li')
  li.dataset.seq = String(envelope.seq)
  const seq = document.createElement('span')
  seq.className = 'seq'
  seq.textContent = `#${envelope.seq}`
  const what = document.createElement('span')
  what.textContent = `${envelope.event} `
  const sev = document.createElement('span')
  sev.className = `badge ${envelope.severity}`
  sev.textContent = envelope.severity
  const data = document.createElement('div')
  data.className = 'mono small'
  data.textContent = JSON.stringify(envelope.data)
  li.append(seq, what, sev, data)
  return li
}

/** @param {{url: string, since: string}} options  the topic's SSE URL, the seq to resume after */
export function startConsole({ url, since }) {
  const events = JSON.parse(document.getElementById('console-event-names').textContent)
  const log = document.getElementById('console-log')
  const state = document.getElementById('console-state')
  const stream = follow(
    url,
    events,
    ({ data }) => {
      if (data?.type !== 'notification') return
      document.getElementById('console-empty')?.remove()
      log.prepend(line(data))
      while (log.children.length > KEEP) log.lastElementChild.remove()
    },
    { lastEventId: since },
  )
  stream.on('subscribed', () => {
    state.textContent = 'live'
  })
  stream.on('state', ({ state: s }) => {
    if (!stream.connected) state.textContent = s
  })

  const form = document.getElementById('console-publish')
  const result = document.getElementById('console-result')
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault()
    result.textContent = 'publishing…'
    try {
      const res = await fetch(form.action, { method: 'POST', body: new FormData(form), credentials: 'same-origin' })
      const body = await res.json()
      if (!res.ok) {
        result.textContent = `refused: ${JSON.stringify(body.errors ?? body.detail)}`
        return
      }
      result.textContent = `stored as seq ${body.seq}`
    } catch (err) {
      result.textContent = `could not publish: ${err}`
    }
  })
  return stream
}
