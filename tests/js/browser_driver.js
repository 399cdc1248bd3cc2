// Drives one headless Chromium page for tests/test_js_client.py, over JSON lines:
//   stdin  {"id": 1, "op": "eval", "expr": "harness.seqs('a')"}             -> value of the expression
//          {"id": 2, "op": "wait", "expr": "...", "timeoutMs": 10000}        -> first truthy value
//          {"id": 3, "op": "leave"} / {"id": 4, "op": "return"}  -> about:blank, then the page again
//   stdout {"id": 1, "ok": true, "value": ...} | {"id": 1, "ok": false, "error": "..."}
// The first stdout line is {"ready": true} once the page's harness has loaded.
// Usage: node browser_driver.js <page url>; env NOTIFY_API (server base URL) and NOTIFY_API_KEY
// (key with the "tokens" scope), used to mint client tokens the way a Nuxt server route would.
import { createInterface } from 'node:readline'

import { chromium } from 'playwright-core'

const [pageUrl] = process.argv.slice(2)
const api = process.env.NOTIFY_API
const apiKey = process.env.NOTIFY_API_KEY
const user = process.env.NOTIFY_USER ?? 'sam'

const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`)

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
  ],
})
const page = await browser.newPage()
page.on('console', (msg) => process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`))
page.on('pageerror', (err) => process.stderr.write(`[page error] ${err.stack ?? err}\n`))

// POST /api/v1/tokens with the API key: what the app's backend does for a logged-in user.
await page.exposeFunction('__notifyToken', async () => {
  const res = await fetch(`${api}/api/v1/tokens`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ user }),
  })
  if (!res.ok) throw new Error(`token endpoint answered ${res.status}: ${await res.text()}`)
  return (await res.json()).token
})

await page.goto(pageUrl)
await page.waitForFunction(() => window.harnessReady === true, null, { timeout: 15_000 })
out({ ready: true })

const rl = createInterface({ input: process.stdin })
for await (const line of rl) {
  if (!line.trim()) continue
  const { id, op, expr, timeoutMs = 15_000 } = JSON.parse(line)
  try {
    let value
    if (op === 'eval') {
      value = await page.evaluate(expr)
    } else if (op === 'wait') {
      const handle = await page.waitForFunction(expr, null, { timeout: timeoutMs, polling: 50 })
      value = await handle.jsonValue()
    } else if (op === 'leave') {
      await page.goto('about:blank') // the page is gone: its sockets and streams close
    } else if (op === 'return') {
      await page.goto(pageUrl)
      await page.waitForFunction(() => window.harnessReady === true, null, { timeout: timeoutMs })
    } else {
      throw new Error(`unknown op ${op}`)
    }
    out({ id, ok: true, value: value ?? null })
  } catch (err) {
    out({ id, ok: false, error: String(err?.message ?? err) })
  }
}
await browser.close()
