// Drives one headless Chromium page for tests/test_dashboard_browser.py, over JSON lines, like
// browser_driver.js (same protocol, same Chromium) but for the server's own pages:
//   stdin  {"id": 1, "op": "goto", "expr": "<url>"}                         -> the final URL
//          {"id": 2, "op": "fill", "expr": "<selector>", "value": "..."}
//          {"id": 3, "op": "click", "expr": "<selector>", "navigates": true}  (waits for the load)
//          {"id": 4, "op": "wait", "expr": "<js expression>", "timeoutMs": 10000}
//          {"id": 5, "op": "eval", "expr": "<js expression>"}
//          {"id": 6, "op": "viewport", "expr": "", "width": 390, "height": 844}
//          {"id": 7, "op": "screenshot", "expr": "<path.png>"}                 (the full page)
//   stdout {"id": 1, "ok": true, "value": ...} | {"id": 1, "ok": false, "error": "..."}
// The first stdout line is {"ready": true} once Chromium runs. Usage: node dashboard_driver.js
import { createInterface } from 'node:readline'

import { chromium } from 'playwright-core'

const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`)

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
})
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } })
page.on('console', (msg) => process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`))
page.on('pageerror', (err) => process.stderr.write(`[page error] ${err.stack ?? err}\n`))
page.on('requestfailed', (req) => process.stderr.write(`[request failed] ${req.url()} ${req.failure()?.errorText}\n`))
out({ ready: true })

const ops = {
  goto: async ({ expr, timeoutMs }) => {
    await page.goto(expr, { timeout: timeoutMs, waitUntil: 'load' })
    return page.url()
  },
  fill: ({ expr, value, timeoutMs }) => page.fill(expr, value, { timeout: timeoutMs }),
  click: async ({ expr, navigates, timeoutMs }) => {
    if (!navigates) return page.click(expr, { timeout: timeoutMs })
    await Promise.all([page.waitForNavigation({ timeout: timeoutMs }), page.click(expr, { timeout: timeoutMs })])
    return page.url()
  },
  wait: async ({ expr, timeoutMs }) => (await page.waitForFunction(expr, null, { timeout: timeoutMs, polling: 50 })).jsonValue(),
  eval: ({ expr }) => page.evaluate(expr),
  viewport: ({ width, height }) => page.setViewportSize({ width, height }),
  screenshot: ({ expr }) => page.screenshot({ path: expr, fullPage: true }).then(() => expr),
}

const rl = createInterface({ input: process.stdin })
for await (const line of rl) {
  if (!line.trim()) continue
  const call = JSON.parse(line)
  call.timeoutMs ??= 15_000
  try {
    const op = ops[call.op]
    if (!op) throw new Error(`unknown op ${call.op}`)
    out({ id: call.id, ok: true, value: (await op(call)) ?? null })
  } catch (err) {
    out({ id: call.id, ok: false, error: String(err?.message ?? err) })
  }
}
await browser.close()
