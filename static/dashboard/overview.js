/**
 * The overview: one uPlot chart per card, drawn from the points of the last 15 minutes that the
 * page carries (`#points`, from the metrics snapshots) and extended by each `dashboard.tick`
 * (an ephemeral SSE event on `system.dashboard` carrying the newest point). The cards' numbers
 * show the newest point. `cardSeries` mirrors routing_app/dashboard/charts.py `card_series`.
 *
 * @module dashboard/overview
 */

import { follow } from './live.js'

const WINDOW_S = 15 * 60
const GAP_STEPS = 2.5 // more than this many snapshot intervals between points: a gap
const PALETTE = ['#2563eb', '#d97706', '#dc2626', '#059669', '#7c3aed', '#0891b2']

const ms = (s) => (s == null ? null : s * 1000)
const sorted = (obj, scale = 1) =>
  Object.fromEntries(
    Object.keys(obj ?? {})
      .sort()
      .map((k) => [k, obj[k] * scale]),
  )

/** card name -> series label -> value in the card's unit, for one point. */
export function cardSeries(p) {
  const connections = sorted(p.connections_active)
  return {
    throughput: { in: p.notifications_in_per_s, out: p.notifications_out_per_s },
    latency: { p50: ms(p.latency_p50_s), p95: ms(p.latency_p95_s), p99: ms(p.latency_p99_s) },
    errors: { errors: p.error_rate * 100 },
    connections: Object.keys(connections).length ? connections : { total: 0 },
    queue: { depth: p.queue_depth, 'oldest (s)': p.queue_oldest_age_s },
    memory: sorted(p.memory_bytes, 1e-6),
    cpu: sorted(p.cpu_per_s, 100),
  }
}

/** As charts.py `format_value`. */
export function formatValue(value, unit, decimals) {
  if (value == null) return '–'
  const text = value.toLocaleString('en-US', {
    minimumFractionDigits: decimals,
    maximumFractionDigits: decimals,
  })
  return unit === '/s' ? `${text}/s` : `${text} ${unit}`.trim()
}

class Chart {
  /** @param {any} uPlot @param {HTMLElement} el @param {object[]} points */
  constructor(uPlot, el, points, stepS) {
    this.uPlot = uPlot
    this.stepS = stepS
    this.el = el
    this.name = el.dataset.chart
    this.card = el.closest('[data-card]')
    this.unit = this.card.dataset.unit
    this.decimals = Number(this.card.dataset.decimals)
    this.rows = points.map((p) => [p.at, cardSeries(p)[this.name]])
    this.keys = []
    this.plot = null
    this.draw()
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(el)
  }

  size() {
    return { width: Math.max(200, this.el.clientWidth), height: 150 }
  }

  draw() {
    const keys = []
    for (const [, values] of this.rows) for (const k of Object.keys(values)) if (!keys.includes(k)) keys.push(k)
    // A break in the line where snapshots are missing (no server published), not a slope.
    const rows = []
    for (const row of this.rows) {
      const prev = rows[rows.length - 1]
      if (prev && row[0] - prev[0] > GAP_STEPS * this.stepS) rows.push([prev[0] + this.stepS, {}])
      rows.push(row)
    }
    const data = [rows.map((r) => r[0]), ...keys.map((k) => rows.map((r) => r[1][k] ?? null))]
    if (this.plot && keys.join('\n') === this.keys.join('\n')) {
      this.plot.setData(data)
    } else {
      this.plot?.destroy()
      this.keys = keys
      this.plot = new this.uPlot(this.options(keys), data, this.el)
    }
    this.el.dataset.points = String(this.rows.length)
  }

  options(keys) {
    const fmt = (v) => formatValue(v, this.unit, this.decimals)
    return {
      ...this.size(),
      padding: [8, 28, 0, 0], // room for the last time label
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [
        {
          stroke: '#6b7280',
          grid: { stroke: '#eef0f3' },
          ticks: { stroke: '#e5e7eb' },
          space: 70, // px between time labels: one line of HH:MM each, never overlapping
          // seconds too when the ticks are under a minute apart (a page just opened)
          values: (u, vals) => vals.map((v) => clockTime(v, vals[1] - vals[0] < 60)),
        },
        {
          stroke: '#6b7280',
          size: 56,
          grid: { stroke: '#eef0f3' },
          ticks: { stroke: '#e5e7eb' },
          values: (u, vals) => vals.map((v) => compact(v)),
        },
      ],
      series: [
        {},
        ...keys.map((k, i) => ({
          label: k,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.5,
          spanGaps: false,
          points: { size: 4 },
          value: (u, v) => fmt(v),
        })),
      ],
    }
  }

  /** Append the tick's point (a point already drawn, same time, is replaced). */
  add(point) {
    const row = [point.at, cardSeries(point)[this.name]]
    const last = this.rows[this.rows.length - 1]
    if (last && last[0] === row[0]) this.rows[this.rows.length - 1] = row
    else if (!last || last[0] < row[0]) this.rows.push(row)
    else return
    const since = row[0] - WINDOW_S
    while (this.rows.length && this.rows[0][0] < since) this.rows.shift()
    this.draw()
  }
}

/** ``HH:MM`` (``HH:MM:SS`` with ``withSeconds``) of a chart's time value (seconds since the
 * epoch), 24-hour, in the browser's zone. */
function clockTime(seconds, withSeconds) {
  const parts = { hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }
  if (withSeconds) parts.second = '2-digit'
  return new Date(seconds * 1000).toLocaleTimeString([], parts)
}

function compact(v) {
  const a = Math.abs(v)
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`
  return `${+v.toFixed(a < 10 ? 2 : 0)}`
}

/** Show the newest point's numbers in each card. */
function updateCards(point) {
  const series = cardSeries(point)
  for (const card of document.querySelectorAll('[data-card]')) {
    const values = series[card.dataset.card] ?? {}
    const dl = card.querySelector('.values')
    dl.replaceChildren(
      ...Object.entries(values).map(([label, value], i) => {
        const row = document.createElement('div')
        const dt = document.createElement('dt')
        dt.textContent = label
        dt.className = `s${i % PALETTE.length}`
        const dd = document.createElement('dd')
        dd.dataset.series = label
        dd.textContent = formatValue(value, card.dataset.unit, Number(card.dataset.decimals))
        row.append(dt, dd)
        return row
      }),
    )
  }
}

/**
 * @param {{url: string, event: string, uplot: string, stepS: number}} options  the topic's SSE
 *   URL, the tick's event name, the URL of uPlot's ES module, the snapshot interval in seconds
 */
export async function startOverview({ url, event, uplot, stepS }) {
  const { default: uPlot } = await import(uplot)
  const points = JSON.parse(document.getElementById('points').textContent)
  const charts = [...document.querySelectorAll('[data-chart]')].map((el) => new Chart(uPlot, el, points, stepS))
  const state = { ticks: 0, last: points[points.length - 1] ?? null }
  window.dashboardOverview = state // for tests and the curious: how many ticks arrived
  follow(url, [event], ({ type, data }) => {
    if (type !== event || data?.type !== 'event') return
    const point = data.payload
    for (const chart of charts) chart.add(point)
    updateCards(point)
    state.ticks += 1
    state.last = point
    document.getElementById('empty-overview')?.remove()
  })
}
