/**
 * The close codes of notify's realtime edge, what each means, and what a client does after it.
 *
 * Protocol: the close codes of the plain JSON WebSocket protocol (docs/realtime-contract.md, and the
 * README's "The plain JSON WebSocket"); the server's numbers never change.
 * Plain ES module, no dependency; socket.js takes its codes and its retry rule from here.
 *
 * @module notify/codes
 */

/** Close codes the server sends, plus the few a client sees without the server sending them. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006, // never sent on the wire: the browser reports it when the connection just dropped
  TOO_BIG: 1009,
  INTERNAL_ERROR: 1011, // the server could not send a frame it owed: reconnect and resume
  TRY_LATER: 1013, // the realtime bus or the database is unavailable: back off and reconnect
  BAD_TOPIC: 4400, // bad topic name or `since`
  UNAUTHORIZED: 4401, // missing, forged or expired token: get a new token
  FORBIDDEN: 4403, // topic not allowed for this user: do not retry
  HEARTBEAT_TIMEOUT: 4408,
  TOO_SLOW: 4429,
  // Ours, client side only: we gave up on a silent socket.
  CLIENT_HEARTBEAT_TIMEOUT: 4000,
})

/**
 * Close codes after which reconnecting cannot help until someone acts (bad topic name, topic not
 * allowed for this user).
 */
export const FATAL_CLOSE_CODES = Object.freeze(new Set([CloseCode.BAD_TOPIC, CloseCode.FORBIDDEN]))

const MEANINGS = Object.freeze({
  [CloseCode.TOO_BIG]: 'a frame was over 64 KB',
  [CloseCode.INTERNAL_ERROR]: 'server could not send a frame',
  [CloseCode.TRY_LATER]: 'server temporarily unable to subscribe',
  [CloseCode.BAD_TOPIC]: 'invalid topic name',
  [CloseCode.UNAUTHORIZED]: 'missing, forged or expired token',
  [CloseCode.FORBIDDEN]: 'topic not allowed for this user',
  [CloseCode.HEARTBEAT_TIMEOUT]: 'server heard nothing for two heartbeat intervals',
  [CloseCode.TOO_SLOW]: 'client read too slowly',
})

/**
 * A short human sentence for a close code (used when the server sent no reason).
 * @param {number} code
 * @returns {string}
 */
export function closeMeaning(code) {
  return MEANINGS[code] ?? `closed with code ${code}`
}

/**
 * @typedef {'reconnect'|'renew-token'|'stop'} CloseDecision
 *  - reconnect: back off and reconnect, resuming from the last seq;
 *  - renew-token: the token was refused; reconnect with a fresh one from the token provider;
 *  - stop: retrying cannot help (fatal code, or a refused token that cannot be replaced).
 */

/**
 * What a client does after the server closed with `code`.
 * @param {number} code
 * @param {{canRenewToken?: boolean}} [opts]  canRenewToken: a token provider (a function) can
 *   fetch a new token; a fixed token (or none) would be refused again
 * @returns {CloseDecision}
 */
export function closeDecision(code, opts = {}) {
  if (FATAL_CLOSE_CODES.has(code)) return 'stop'
  if (code === CloseCode.UNAUTHORIZED) return opts.canRenewToken ? 'renew-token' : 'stop'
  return 'reconnect'
}
