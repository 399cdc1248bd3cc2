/**
 * What the WebSocket manager (socket.js) needs for its fallback to Server-Sent Events, apart from
 * the switching itself: its options, the delay before trying a WebSocket again, and publishing
 * over HTTP (`POST /api/v1/topics/<topic>/publish` with the client token; the server's side is
 * channels_app/api.py and channels_app/client_publish.py).
 *
 * Plain ES module, no dependency.
 *
 * @module notify/fallback
 */

import { backoffDelay } from './reconnect.js'

/**
 * @typedef {object} FallbackOptions
 * @property {number} [after=3]  consecutive WebSockets that close before `subscribed` without a
 *   close frame from the server (what a proxy refusing the upgrade looks like) before using SSE
 * @property {number} [openTimeoutMs=10000]  a WebSocket not open after this long: use SSE at once
 * @property {import('./reconnect.js').BackoffOptions} [retry={baseMs: 5000, maxMs: 60000}]  while
 *   on SSE, how long to wait before trying a WebSocket again (doubling from baseMs up to maxMs,
 *   jittered between half and all of it)
 * @property {boolean} [withCredentials]  send cookies with the event stream (default: when no
 *   `token` is given, i.e. the session cookie authenticates)
 */

/** @typedef {'websocket'|'sse'} Transport */

export const FALLBACK_DEFAULTS = Object.freeze({ after: 3, openTimeoutMs: 10_000, retry: { baseMs: 5_000, maxMs: 60_000 } })

/** What the `code` of a refused HTTP publish is, by status (as the socket's error frame codes). */
export const HTTP_PUBLISH_CODES = Object.freeze({
  400: 'invalid',
  401: 'unauthorized',
  403: 'forbidden',
  413: 'invalid',
  415: 'invalid',
  429: 'rate_limited',
  503: 'unavailable',
})

/** @param {boolean|FallbackOptions|undefined} option @returns {Required<FallbackOptions>|null} */
export function fallbackOptions(option) {
  if (option === false) return null
  if (option !== undefined && option !== true && (typeof option !== 'object' || option === null)) {
    throw new TypeError('fallback must be true, false or {after, openTimeoutMs, retry}')
  }
  const merged = { ...FALLBACK_DEFAULTS, ...(option === true || option === undefined ? {} : option) }
  merged.retry = { ...FALLBACK_DEFAULTS.retry, ...(merged.retry ?? {}) }
  if (!Number.isInteger(merged.after) || merged.after < 1) {
    throw new TypeError(`fallback.after must be a positive integer, not ${merged.after}`)
  }
  if (!(merged.openTimeoutMs > 0)) {
    throw new TypeError(`fallback.openTimeoutMs must be a positive number of ms, not ${merged.openTimeoutMs}`)
  }
  return merged
}

/**
 * Delay before WebSocket try number `attempt` (0-based) while on SSE: the ceiling doubles from
 * `baseMs` up to `maxMs`, and the delay is between half and all of it (never about 0, as full
 * jitter could be: a socket that was just refused is not tried again at once).
 * @param {number} attempt
 * @param {{baseMs: number, maxMs: number}} retry
 * @param {() => number} [random=Math.random]
 * @returns {number} milliseconds
 */
export function retryDelay(attempt, retry, random = Math.random) {
  const { baseMs, maxMs } = retry
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt))
  return ceiling / 2 + backoffDelay(attempt, { baseMs: baseMs / 2, maxMs: maxMs / 2 }, random)
}

/**
 * @typedef {Error & {code: string, status?: number, frame?: any, retryAfterS?: number,
 *   outcomeUnknown?: boolean}} PublishError
 *  `code`: as the socket's error frames (`invalid`, `unauthorized`, `forbidden`, `rate_limited`,
 *  `unavailable`), or `too_large`, `token`, `network`, `http`; `frame`: the server's
 *  `{detail, errors}`; `outcomeUnknown`: the request may have been stored (network failure).
 */

/**
 * Publish `frame` (a socket's publish frame) with one HTTP POST to `url`.
 * @param {string} url  `<server>/api/v1/topics/<topic>/publish`
 * @param {{ref?: string, event: string, data?: any, severity?: string}} frame
 * @param {{token: () => Promise<string|null>, fetch: typeof fetch, maxBytes: number}} how
 * @returns {Promise<{type: 'ack', seq: number, id: string, ref?: string}>} the server's ack;
 *   rejects with a PublishError
 */
export async function postPublish(url, frame, how) {
  const fail = (message, fields) => Object.assign(new Error(message), fields)
  const body = JSON.stringify({
    event: frame.event,
    data: frame.data ?? {},
    ...(frame.ref != null ? { ref: frame.ref } : {}),
    ...(frame.severity ? { severity: frame.severity } : {}),
  })
  if (new TextEncoder().encode(body).length > how.maxBytes) {
    throw fail('publish refused locally: too large', { code: 'too_large' })
  }
  let token
  try {
    token = await how.token()
  } catch (err) {
    throw fail(`token provider failed: ${err?.message ?? err}`, { code: 'token' })
  }
  if (!token) {
    throw fail('publishing over HTTP (the SSE fallback) needs a client token: pass options.token', {
      code: 'unauthorized',
    })
  }
  // Called as a plain function: a browser's fetch refuses any other `this` than the window.
  const send = how.fetch
  let res
  try {
    res = await send(url, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body,
    })
  } catch (err) {
    // The request may have reached the server: as for a socket lost before the ack.
    throw fail(`publish over HTTP failed: ${err?.message ?? err}`, { code: 'network', outcomeUnknown: true })
  }
  let answer = null
  try {
    answer = await res.json()
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  if (res.status === 202 && answer?.type === 'ack') return answer
  const retryAfter = Number(res.headers?.get?.('Retry-After'))
  throw fail(answer?.detail ?? `publish answered HTTP ${res.status}`, {
    code: HTTP_PUBLISH_CODES[res.status] ?? 'http',
    status: res.status,
    frame: answer,
    ...(retryAfter > 0 ? { retryAfterS: retryAfter } : {}),
  })
}
