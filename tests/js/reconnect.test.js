// Unit tests of static/notify/reconnect.js (the seq de-duplication both transports share) and of
// static/notify/codes.js (what a client does after each close code).
// Run: node --test tests/js/reconnect.test.js   (pytest runs it from tests/test_js_client.py)
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { CloseCode, closeDecision, closeMeaning, FATAL_CLOSE_CODES } from '../../static/notify/codes.js'
import { admitSeq, seqOfEventId } from '../../static/notify/reconnect.js'
import * as socket from '../../static/notify/socket.js'

/** Feed `seqs` through admitSeq from `start`; returns what is delivered and every gap. */
function run(start, seqs) {
  let lastSeq = start
  const delivered = []
  const gaps = []
  for (const seq of seqs) {
    const verdict = admitSeq(lastSeq, seq)
    if (verdict.gap) gaps.push(verdict.gap)
    if (verdict.deliver) delivered.push(seq)
    lastSeq = verdict.lastSeq
  }
  return { delivered, gaps, lastSeq }
}

describe('admitSeq', () => {
  test('a replay overlapping what was delivered is dropped; new seqs go through in order', () => {
    assert.deepEqual(run(null, [1, 2, 3, 2, 3, 4, 5]), { delivered: [1, 2, 3, 4, 5], gaps: [], lastSeq: 5 })
  })

  test('resuming after a seq drops it and everything before it', () => {
    assert.deepEqual(run(7, [6, 7, 8]), { delivered: [8], gaps: [], lastSeq: 8 })
  })

  test('a live-only start (no position) takes its first seq as the position', () => {
    assert.deepEqual(run(null, [41, 42]), { delivered: [41, 42], gaps: [], lastSeq: 42 })
  })

  test('a jump is delivered and reported as a gap', () => {
    assert.deepEqual(run(3, [4, 7]), { delivered: [4, 7], gaps: [{ from: 5, to: 6 }], lastSeq: 7 })
  })

  test('a notification without a numeric seq is delivered and moves nothing', () => {
    for (const seq of [undefined, null, '5', Number.NaN]) {
      assert.deepEqual(admitSeq(3, seq), { deliver: true, lastSeq: 3, gap: null })
    }
  })
})

describe('seqOfEventId', () => {
  test('reads our ids and django-eventstream ones', () => {
    assert.equal(seqOfEventId('42'), 42)
    assert.equal(seqOfEventId('reverse_flow:cluster-a:42'), 42)
    assert.equal(seqOfEventId('alerts.k8s:0'), 0)
    for (const id of ['', null, undefined, 'abc', '4x']) assert.equal(seqOfEventId(id), null)
  })
})

describe('close codes', () => {
  test("keep the server's numbers", () => {
    assert.deepEqual(
      [CloseCode.TOO_BIG, CloseCode.TRY_LATER, CloseCode.BAD_TOPIC, CloseCode.UNAUTHORIZED],
      [1009, 1013, 4400, 4401],
    )
    assert.deepEqual([CloseCode.FORBIDDEN, CloseCode.HEARTBEAT_TIMEOUT, CloseCode.TOO_SLOW], [4403, 4408, 4429])
    assert.deepEqual([...FATAL_CLOSE_CODES].sort(), [4400, 4403])
  })

  test('bad request and forbidden stop; transient trouble reconnects', () => {
    for (const code of [4400, 4403]) assert.equal(closeDecision(code, { canRenewToken: true }), 'stop')
    for (const code of [1001, 1006, 1009, 1011, 1013, 4000, 4408, 4429]) {
      assert.equal(closeDecision(code), 'reconnect', `code ${code}`)
    }
  })

  test('an unauthenticated close renews the token when a provider can, and stops otherwise', () => {
    assert.equal(closeDecision(4401, { canRenewToken: true }), 'renew-token')
    assert.equal(closeDecision(4401, { canRenewToken: false }), 'stop')
    assert.equal(closeDecision(4401), 'stop')
  })

  test('every server code has a meaning; socket.js re-exports the same objects', () => {
    for (const code of [1009, 1013, 4400, 4401, 4403, 4408, 4429]) {
      assert.doesNotMatch(closeMeaning(code), /closed with code/)
    }
    assert.equal(closeMeaning(4999), 'closed with code 4999')
    assert.equal(socket.CloseCode, CloseCode)
    assert.equal(socket.FATAL_CLOSE_CODES, FATAL_CLOSE_CODES)
    assert.equal(socket.closeMeaning, closeMeaning)
  })
})
