// Unit tests of static/notify/push.js (subscribePush, unsubscribePush) with a scripted pushManager
// and fetch: the calls it makes to the server and what it does with the answers. The service
// worker runs in headless Chromium in tests/test_push_browser.py, which also runs this file.
// Run: node --test tests/js/push.test.js
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { PushError, base64UrlToBytes, subscribePush, unsubscribePush } from '../../static/notify/push.js'

const BASE = 'https://notify.test'
// A VAPID public key as GET /api/v1/push/key gives it: 65 bytes, base64url without padding.
const KEY_BYTES = Uint8Array.from({ length: 65 }, (_, i) => (i === 0 ? 4 : (i * 37) % 256))
const PUBLIC_KEY = Buffer.from(KEY_BYTES).toString('base64url')
const ENDPOINT = 'https://push.example.net/send/abc?x=1&y=2'

/** A fetch that answers from `routes` ("METHOD /path" -> [status, body]) and records each call. */
function scriptedFetch(routes) {
  const calls = []
  const fetch = async (url, init) => {
    const { pathname, search } = new URL(url)
    calls.push({ method: init.method, path: pathname + search, headers: init.headers, body: init.body })
    const [status, body] = routes[`${init.method} ${pathname}`] ?? [404, { detail: 'no such route' }]
    return {
      ok: status >= 200 && status < 300,
      status,
      json: async () => body,
    }
  }
  return { fetch, calls }
}

/** A ServiceWorkerRegistration whose pushManager hands out one scripted subscription. */
function scriptedRegistration(existing = null) {
  const state = { subscription: existing, subscribedWith: null, unsubscribed: 0 }
  const make = (applicationServerKey) => ({
    endpoint: ENDPOINT,
    options: { applicationServerKey: applicationServerKey?.buffer ?? null },
    toJSON: () => ({ endpoint: ENDPOINT, expirationTime: null, keys: { p256dh: 'BPk', auth: 'QXU' } }),
    unsubscribe: async () => {
      state.unsubscribed += 1
      state.subscription = null
      return true
    },
  })
  state.registration = {
    pushManager: {
      getSubscription: async () => state.subscription,
      subscribe: async (options) => {
        state.subscribedWith = options
        state.subscription = make(options.applicationServerKey)
        return state.subscription
      },
    },
  }
  state.make = make
  return state
}

describe('subscribePush', () => {
  test('subscribes with the server key and posts the subscription with the token', async () => {
    const { fetch, calls } = scriptedFetch({
      'GET /api/v1/push/key': [200, { public_key: PUBLIC_KEY }],
      'POST /api/v1/push/subscriptions': [201, { endpoint: ENDPOINT, created: true }],
    })
    const state = scriptedRegistration()
    const subscription = await subscribePush(state.registration, { url: `${BASE}/`, token: async () => 'tok-1', fetch })

    assert.equal(subscription.endpoint, ENDPOINT)
    assert.equal(state.subscribedWith.userVisibleOnly, true)
    assert.deepEqual([...state.subscribedWith.applicationServerKey], [...KEY_BYTES])
    assert.deepEqual(
      calls.map((c) => [c.method, c.path, c.headers.Authorization]),
      [
        ['GET', '/api/v1/push/key', 'Bearer tok-1'],
        ['POST', '/api/v1/push/subscriptions', 'Bearer tok-1'],
      ],
    )
    assert.deepEqual(JSON.parse(calls[1].body), {
      endpoint: ENDPOINT,
      expirationTime: null,
      keys: { p256dh: 'BPk', auth: 'QXU' },
    })
  })

  test('replaces a subscription made with another key, keeps one made with this key', async () => {
    const routes = {
      'GET /api/v1/push/key': [200, { public_key: PUBLIC_KEY }],
      'POST /api/v1/push/subscriptions': [200, { endpoint: ENDPOINT, created: false }],
    }
    const stale = scriptedRegistration()
    stale.subscription = stale.make(new Uint8Array(65).fill(9))
    await subscribePush(stale.registration, { url: BASE, token: 't', fetch: scriptedFetch(routes).fetch })
    assert.equal(stale.unsubscribed, 1)
    assert.ok(stale.subscribedWith)

    const current = scriptedRegistration()
    current.subscription = current.make(KEY_BYTES)
    await subscribePush(current.registration, { url: BASE, token: 't', fetch: scriptedFetch(routes).fetch })
    assert.equal(current.unsubscribed, 0)
    assert.equal(current.subscribedWith, null)
  })

  test("an answer of the server is a PushError with its status, detail and field errors", async () => {
    const errors = [{ loc: ['endpoint'], msg: 'must be an https:// URL' }]
    const { fetch } = scriptedFetch({
      'GET /api/v1/push/key': [200, { public_key: PUBLIC_KEY }],
      'POST /api/v1/push/subscriptions': [400, { detail: 'the subscription is not valid; see errors', errors }],
    })
    const failure = await subscribePush(scriptedRegistration().registration, { url: BASE, token: 't', fetch }).catch(
      (err) => err,
    )
    assert.ok(failure instanceof PushError)
    assert.equal(failure.status, 400)
    assert.match(failure.message, /POST \/push\/subscriptions answered 400: the subscription is not valid/)
    assert.deepEqual(failure.errors, errors)
  })

  test('a session sends the CSRF token instead of a bearer token', async () => {
    const { fetch, calls } = scriptedFetch({
      'GET /api/v1/push/key': [200, { public_key: PUBLIC_KEY }],
      'POST /api/v1/push/subscriptions': [201, {}],
    })
    await subscribePush(scriptedRegistration().registration, { url: BASE, csrfToken: 'csrf-1', fetch })
    assert.equal(calls[1].headers['X-CSRFToken'], 'csrf-1')
    assert.equal(calls[1].headers.Authorization, undefined)
  })
})

describe('unsubscribePush', () => {
  test('deletes on the server by endpoint, then in the browser', async () => {
    const { fetch, calls } = scriptedFetch({ 'DELETE /api/v1/push/subscriptions': [204, null] })
    const state = scriptedRegistration()
    state.subscription = state.make(KEY_BYTES)
    assert.equal(await unsubscribePush(state.registration, { url: BASE, token: 't', fetch }), true)
    assert.equal(calls[0].path, `/api/v1/push/subscriptions?endpoint=${encodeURIComponent(ENDPOINT)}`)
    assert.equal(state.unsubscribed, 1)
  })

  test('a subscription the server no longer knows is still removed in the browser', async () => {
    const { fetch } = scriptedFetch({ 'DELETE /api/v1/push/subscriptions': [404, { detail: 'none' }] })
    const state = scriptedRegistration()
    state.subscription = state.make(KEY_BYTES)
    assert.equal(await unsubscribePush(state.registration, { url: BASE, token: 't', fetch }), true)
    assert.equal(state.unsubscribed, 1)
    assert.equal(await unsubscribePush(state.registration, { url: BASE, token: 't', fetch }), false)
  })
})

test('base64UrlToBytes reads unpadded base64url', () => {
  assert.deepEqual([...base64UrlToBytes('-_8')], [0xfb, 0xff])
  assert.deepEqual([...base64UrlToBytes(PUBLIC_KEY)], [...KEY_BYTES])
})
