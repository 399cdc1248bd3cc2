/**
 * Offline state of the notify client: per topic, the last notifications delivered and the last
 * seq, kept in a storage so the next page load can show them at once and resume after that seq.
 * Used by NotifySocketManager (socket.js) with its `persist` option.
 *
 * A storage adapter is any object with `get(key)`, `set(key, value)` and `remove(key)`, each
 * returning its result or a Promise of it (values are strings): `localStorage` (the default,
 * through `localStorageAdapter`), IndexedDB (e.g. idb-keyval's get/set/del), Nuxt's
 * `useStorage()`, Capacitor Preferences. A storage that fails (quota, disabled storage, private
 * mode, a corrupt value) never breaks the client: the state is then kept in memory only, and one
 * warning says why.
 *
 * Plain ES module, no dependency.
 *
 * @module notify/persist
 */

/** Notifications kept per topic unless `persistLimit` says otherwise. */
export const DEFAULT_PERSIST_LIMIT = 50
const FORMAT = 1 // the stored record's version: {v, lastSeq, notifications}

/**
 * @typedef {object} StorageAdapter
 * @property {(key: string) => (string|null|undefined|Promise<string|null|undefined>)} get
 * @property {(key: string, value: string) => (void|Promise<void>)} set
 * @property {(key: string) => (void|Promise<void>)} remove
 */

/**
 * @typedef {object} TopicState
 * @property {number|null} lastSeq  last seq delivered on the topic
 * @property {object[]} notifications  the last envelopes delivered, oldest first
 */

/** @returns {StorageAdapter} a storage that lives as long as the page */
export function memoryStorage() {
  const values = new Map()
  return {
    get: (key) => values.get(key) ?? null,
    set: (key, value) => {
      values.set(key, value)
    },
    remove: (key) => {
      values.delete(key)
    },
  }
}

/**
 * `localStorage` (or another Web Storage) as an adapter. Reading `globalThis.localStorage` itself
 * throws where storage is disabled; that, like a full quota, surfaces on first use.
 * @param {Storage} [storage]
 * @returns {StorageAdapter}
 */
export function localStorageAdapter(storage) {
  const web = () => storage ?? globalThis.localStorage
  return {
    get: (key) => web().getItem(key),
    set: (key, value) => web().setItem(key, value),
    remove: (key) => web().removeItem(key),
  }
}

/** @param {any} value @returns {value is PromiseLike<any>} */
function isThenable(value) {
  return value != null && typeof value.then === 'function'
}

/**
 * Per-topic state in one storage, written at most once per microtask per topic (a replay of
 * many notifications is one write), and never throwing.
 */
export class TopicStore {
  /**
   * @param {true|StorageAdapter} storage  true: localStorage
   * @param {{limit?: number, prefix?: string, warn?: (message: string) => void}} [options]
   *   limit: notifications kept per topic; prefix: of every key (`<prefix>:<topic>`);
   *   warn: where the one warning goes (default console.warn)
   */
  constructor(storage, options = {}) {
    if (storage === true) {
      this.adapter = localStorageAdapter()
    } else if (
      storage &&
      typeof storage.get === 'function' &&
      typeof storage.set === 'function' &&
      typeof storage.remove === 'function'
    ) {
      this.adapter = storage
    } else {
      throw new TypeError('persist must be true (localStorage) or a storage adapter with get(key), set(key, value) and remove(key)')
    }
    this.limit = options.limit ?? DEFAULT_PERSIST_LIMIT
    if (!Number.isInteger(this.limit) || this.limit < 1) {
      throw new TypeError(`persistLimit must be a positive integer, not ${options.limit}`)
    }
    this.prefix = options.prefix ?? 'notify'
    this._warn = options.warn ?? ((message) => console.warn(message))
    this.warned = false
    /** @type {Map<string, TopicState>} states waiting for the next write */
    this._dirty = new Map()
    /** @type {Map<string, Promise<void>>} the last write per key, so writes land in order */
    this._writes = new Map()
  }

  /** @param {string} topic @returns {string} */
  key(topic) {
    return `${this.prefix}:${topic}`
  }

  /**
   * The stored state of `topic`: synchronously when the adapter answers synchronously (so a page
   * can show it before anything else happens), else a Promise. Null when nothing (usable) is
   * stored.
   * @param {string} topic
   * @returns {TopicState|null|Promise<TopicState|null>}
   */
  load(topic) {
    const raw = this._call(() => this.adapter.get(this.key(topic)), null)
    return isThenable(raw) ? raw.then((text) => this._parse(topic, text)) : this._parse(topic, raw)
  }

  /**
   * Remember `state` for `topic` (its last `limit` notifications), written after the current
   * task's other changes.
   * @param {string} topic @param {TopicState} state
   */
  save(topic, state) {
    const first = this._dirty.size === 0
    this._dirty.set(topic, state)
    if (first) queueMicrotask(() => this._flush())
  }

  /** Forget what is stored for `topic` (e.g. on logout). @param {string} topic */
  remove(topic) {
    this._dirty.delete(topic)
    this._queue(this.key(topic), () => this.adapter.remove(this.key(topic)))
  }

  _flush() {
    const dirty = [...this._dirty]
    this._dirty.clear()
    for (const [topic, state] of dirty) {
      const text = JSON.stringify({
        v: FORMAT,
        lastSeq: state.lastSeq,
        notifications: state.notifications.slice(-this.limit),
      })
      this._queue(this.key(topic), () => this.adapter.set(this.key(topic), text))
    }
  }

  /** Run `write` after the previous write of `key` (an async storage must not reorder them). */
  _queue(key, write) {
    const previous = this._writes.get(key)
    if (!previous) {
      const result = this._call(write, undefined)
      if (isThenable(result)) this._track(key, result)
      return
    }
    this._track(
      key,
      previous.then(() => this._call(write, undefined)),
    )
  }

  /** @param {string} key @param {Promise<any>} pending */
  _track(key, pending) {
    const settled = Promise.resolve(pending).then(() => {
      if (this._writes.get(key) === settled) this._writes.delete(key)
    })
    this._writes.set(key, settled)
  }

  /**
   * `fn()`, with a failure (thrown or rejected) turned into `fallback` and a switch to memory.
   * @template T @param {() => any} fn @param {T} fallback
   */
  _call(fn, fallback) {
    let result
    try {
      result = fn()
    } catch (err) {
      this._failed(err)
      return fallback
    }
    if (!isThenable(result)) return result
    return Promise.resolve(result).catch((err) => {
      this._failed(err)
      return fallback
    })
  }

  /** The storage failed: keep going in memory, and say so once. @param {any} err */
  _failed(err) {
    this.adapter = memoryStorage()
    this._once(`notify: offline storage failed (${err?.message ?? err}); offline state is kept in memory only`)
  }

  /** @param {string} message */
  _once(message) {
    if (this.warned) return
    this.warned = true
    this._warn(message)
  }

  /** @param {string} topic @param {any} text @returns {TopicState|null} */
  _parse(topic, text) {
    if (text == null || text === '') return null
    let record
    try {
      record = typeof text === 'string' ? JSON.parse(text) : text
    } catch {
      record = null
    }
    const lastSeq = record?.lastSeq
    if (
      record?.v !== FORMAT ||
      !Array.isArray(record.notifications) ||
      !(lastSeq === null || Number.isInteger(lastSeq))
    ) {
      this._once(`notify: the offline state stored for topic ${topic} is not readable; it is ignored`)
      return null
    }
    const notifications = record.notifications
      .filter((n) => n && typeof n === 'object' && Number.isInteger(n.seq))
      .slice(-this.limit)
    return { lastSeq, notifications }
  }
}
