// Shows that static/notify/notify-sw.js turns a push message into a notification, in headless
// Chromium (tests/test_push_browser.py runs it): one page load registers the worker, DevTools'
// ServiceWorker.deliverPushMessage hands it a push event as a push service would (trusted, so
// event.waitUntil works), and the page reads registration.getNotifications().
// Usage: node push_driver.js <page url> <push message text>; prints one JSON line:
//   {"notifications": [{"title", "body", "tag", "data"}, ...]} or {"error": "..."}.
import { chromium } from 'playwright-core'

const [pageUrl, message] = process.argv.slice(2)
const origin = new URL(pageUrl).origin
const WAIT_MS = 15_000

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
})
try {
  const context = await browser.newContext()
  await context.grantPermissions(['notifications'], { origin })
  const page = await context.newPage()
  page.on('console', (msg) => process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`))
  page.on('pageerror', (err) => process.stderr.write(`[page error] ${err.stack ?? err}\n`))
  const cdp = await context.newCDPSession(page)
  const registered = new Promise((resolve) => {
    cdp.on('ServiceWorker.workerVersionUpdated', ({ versions }) => {
      const running = versions.find((v) => v.runningStatus === 'running' && v.status === 'activated')
      if (running) resolve(running.registrationId)
    })
  })
  await cdp.send('ServiceWorker.enable')
  await page.goto(pageUrl)
  await page.waitForFunction(() => window.swReady, null, { timeout: WAIT_MS })
  let timer
  const registrationId = await Promise.race([
    registered,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error('no active service worker')), WAIT_MS)
    }),
  ]).finally(() => clearTimeout(timer))
  await cdp.send('ServiceWorker.deliverPushMessage', { origin, registrationId, data: message })
  const handle = await page.waitForFunction(
    async () => {
      const registration = await navigator.serviceWorker.ready
      const shown = await registration.getNotifications()
      return shown.length
        ? shown.map((n) => ({ title: n.title, body: n.body, tag: n.tag, data: n.data }))
        : null
    },
    null,
    { timeout: WAIT_MS, polling: 50 },
  )
  process.stdout.write(`${JSON.stringify({ notifications: await handle.jsonValue() })}\n`)
} catch (err) {
  process.stdout.write(`${JSON.stringify({ error: String(err?.stack ?? err) })}\n`)
} finally {
  await browser.close()
}
