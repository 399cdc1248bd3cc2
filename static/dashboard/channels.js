/**
 * The channels page: each breaker transition (a notification on `system.breakers`, events
 * `breaker.*`, data {provider_id, to, ...}) updates its provider's state badge in place.
 *
 * @module dashboard/channels
 */

import { follow } from './live.js'

const EVENTS = ['breaker.opened', 'breaker.half_open', 'breaker.closed', 'breaker.forced_open', 'breaker.disabled']
const LABELS = { half_open: 'half-open', forced_open: 'forced open' }

/** @param {string} url  the SSE URL of system.breakers */
export function followBreakers(url) {
  return follow(url, EVENTS, ({ data }) => {
    const change = data?.data
    if (!change) return
    const badge = document.querySelector(`[data-provider="${change.provider_id}"] [data-breaker-state]`)
    if (!badge) return
    badge.className = `badge ${change.to}`
    badge.textContent = LABELS[change.to] ?? change.to
  })
}
