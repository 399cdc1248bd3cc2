/**
 * How a notify client comes back after losing its connection: when to try again (backoff with
 * full jitter) and which notifications to keep once it is back (per-topic seq de-duplication).
 * Shared by the WebSocket manager (socket.js) and the event stream (sse.js).
 *
 * Plain ES module, no dependency.
 *
 * @module notify/reconnect
 */

/**
 * @typedef {object} BackoffOptions
 * @property {number} [baseMs=500]  ceiling of the first retry's delay
 * @property {number} [maxMs=30000] ceiling of every delay
 */

/**
 * Delay before reconnect attempt number `attempt` (0 for the first retry), with "full jitter":
 * uniformly random in [0, min(maxMs, baseMs * 2^attempt)). Full jitter spreads the reconnects of
 * many clients after a server restart instead of synchronising them in waves.
 *
 * @param {number} attempt  0-based count of failed attempts since the last successful connection
 * @param {BackoffOptions} [options]
 * @param {() => number} [random=Math.random]  source of [0, 1) numbers (injectable for tests)
 * @returns {number} delay in milliseconds, 0 <= delay < min(maxMs, baseMs * 2^attempt)
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const baseMs = options.baseMs ?? 500
  const maxMs = options.maxMs ?? 30_000
  // 2 ** 1100 is Infinity, and min() then picks maxMs: no overflow for any attempt count.
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt))
  return Math.floor(random() * ceiling)
}

/**
 * @typedef {object} SeqVerdict
 * @property {boolean} deliver  false: `seq` was already delivered (a replay overlapping what we had)
 * @property {number|null} lastSeq  the position after this notification
 * @property {{from: number, to: number}|null} gap  seqs skipped before `seq` (should never happen:
 *   the server replays everything it retains, and says `reset` when it cannot)
 */

/**
 * The de-duplication rule of both transports: a topic's seqs are delivered once each, in order.
 * Given the last seq delivered on a topic and the seq of an incoming notification, say whether to
 * deliver it and where the topic stands afterwards. A notification without a numeric seq is
 * delivered and moves nothing; with no position yet (`lastSeq` null, a live-only start) every
 * seq is new.
 *
 * @param {number|null} lastSeq  last seq delivered, or null
 * @param {number|null|undefined} seq  the incoming notification's seq
 * @returns {SeqVerdict}
 */
export function admitSeq(lastSeq, seq) {
  if (typeof seq !== 'number' || !Number.isFinite(seq)) return { deliver: true, lastSeq, gap: null }
  if (lastSeq == null) return { deliver: true, lastSeq: seq, gap: null }
  if (seq <= lastSeq) return { deliver: false, lastSeq, gap: null }
  const gap = seq > lastSeq + 1 ? { from: lastSeq + 1, to: seq - 1 } : null
  return { deliver: true, lastSeq: seq, gap }
}

/**
 * The seq in an SSE event id: ours is the seq itself ("42"); django-eventstream's form is
 * "<topic>:42".
 * @param {string|null|undefined} id
 * @returns {number|null} null when the id holds no seq
 */
export function seqOfEventId(id) {
  const match = /(?:^|:)(\d+)$/.exec(id ?? '')
  return match ? Number(match[1]) : null
}
