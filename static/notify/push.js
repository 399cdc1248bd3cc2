/**
 * Web Push for notify: subscribe this browser so that push channels reach it while no page is open.
 *
 * Protocol: docs/js-client.md, "Web Push". The server's endpoints: `GET /api/v1/push/key` (the
 * VAPID public key), `POST /api/v1/push/subscriptions` (the subscription's `toJSON()`),
 * `DELETE /api/v1/push/subscriptions?endpoint=`. The service worker that shows the notifications is
 * `notify-sw.js`, served from the page's own origin (see the docs for its scope).
 * Plain ES module, no build step, no dependency.
 *
 * @module notify/push
 */

/**
 * @typedef {object} PushOptions
 * @property {string} [url]  base URL of the notify server, e.g. "https://notify.example.com".
 *   Default: the page's own origin.
 * @property {string|null|(() => (string|null|Promise<string|null>))} [token]  client token (POST
 *   /api/v1/tokens), or a function returning one. Null/absent: the session cookie (then `csrfToken`
 *   is needed for the POST and DELETE).
 * @property {string} [csrfToken]  the csrftoken cookie's value, sent as X-CSRFToken with a session.
 * @property {typeof fetch} [fetch]  the fetch to use (default: the global one).
 */

/** An answer of the server that is not a success: `status` and the server's `detail`. */
export class PushError extends Error {
  /**
   * @param {string} message
   * @param {number} status  HTTP status (0 when the browser itself refused, e.g. no permission)
   * @param {Array<{loc: Array<string|number>, msg: string}>} [errors]
   */
  constructor(message, status, errors = []) {
    super(message)
    this.name = 'PushError'
    this.status = status
    this.errors = errors
  }
}

/**
 * The bytes of a base64url string (the VAPID public key as the server gives it).
 * @param {string} text
 * @returns {Uint8Array}
 */
export function base64UrlToBytes(text) {
  const base64 = text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (text.length % 4)) % 4)
  const binary = atob(base64)
  const bytes = new Uint8Array(binary.length)
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i)
  return bytes
}

const apiBase = (url) => `${(url ?? globalThis.location?.origin ?? '').replace(/\/+$/, '')}/api/v1`

async function headersFor(options, json) {
  const headers = {}
  if (json) headers['Content-Type'] = 'application/json'
  const token = typeof options.token === 'function' ? await options.token() : options.token
  if (token) headers.Authorization = `Bearer ${token}`
  else if (options.csrfToken) headers['X-CSRFToken'] = options.csrfToken
  return headers
}

async function call(options, method, path, body) {
  const doFetch = options.fetch ?? globalThis.fetch
  const res = await doFetch(`${apiBase(options.url)}${path}`, {
    method,
    headers: await headersFor(options, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: options.token ? 'omit' : 'include',
  })
  if (res.ok) return res.status === 204 ? null : res.json()
  let detail = `${method} ${path} answered ${res.status}`
  let errors = []
  try {
    const answer = await res.json()
    if (answer?.detail) detail = `${detail}: ${answer.detail}`
    errors = Array.isArray(answer?.errors) ? answer.errors : []
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  throw new PushError(detail, res.status, errors)
}

/**
 * Subscribe this browser to notify's Web Push and register the subscription for the user.
 *
 * Asks for notification permission if not granted yet (call it from a user gesture, e.g. a click),
 * fetches the server's VAPID key, subscribes `registration.pushManager` with it (or reuses an
 * existing subscription made with the same key; one made with another key is replaced), and POSTs
 * the subscription. Calling it again is harmless: the server updates the same endpoint.
 *
 * @param {ServiceWorkerRegistration} registration  the registration of notify-sw.js
 * @param {PushOptions} [options]
 * @returns {Promise<PushSubscription>}
 * @throws {PushError} permission denied (status 0) or an answer of the server (its status, detail)
 */
export async function subscribePush(registration, options = {}) {
  const Notif = globalThis.Notification
  if (Notif && Notif.permission !== 'granted') {
    const permission = await Notif.requestPermission()
    if (permission !== 'granted') {
      throw new PushError(`notification permission is ${permission}: allow notifications for this site`, 0)
    }
  }
  const { public_key: publicKey } = await call(options, 'GET', '/push/key')
  const applicationServerKey = base64UrlToBytes(publicKey)
  let subscription = await registration.pushManager.getSubscription()
  if (subscription && !sameKey(subscription.options?.applicationServerKey, applicationServerKey)) {
    await subscription.unsubscribe()
    subscription = null
  }
  if (!subscription) {
    subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey })
  }
  await call(options, 'POST', '/push/subscriptions', subscription.toJSON())
  return subscription
}

function sameKey(current, wanted) {
  if (!current) return true // the browser does not say: keep the subscription
  const bytes = new Uint8Array(current)
  return bytes.length === wanted.length && bytes.every((b, i) => b === wanted[i])
}

/**
 * Remove this browser's subscription: on the server first (so no push is sent to it any more),
 * then in the browser. Resolves to false when the browser had none.
 *
 * @param {ServiceWorkerRegistration} registration
 * @param {PushOptions} [options]
 * @returns {Promise<boolean>}
 * @throws {PushError} an answer of the server other than 204 or 404 (already gone there)
 */
export async function unsubscribePush(registration, options = {}) {
  const subscription = await registration.pushManager.getSubscription()
  if (!subscription) return false
  try {
    await call(options, 'DELETE', `/push/subscriptions?endpoint=${encodeURIComponent(subscription.endpoint)}`)
  } catch (err) {
    if (!(err instanceof PushError && err.status === 404)) throw err
  }
  await subscription.unsubscribe()
  return true
}
