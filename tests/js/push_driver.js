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
  // Polled from here: waitForFunction takes a promise the page returns for a truthy answer, so
  // an async predicate could end the wait before any notification was shown.
  const deadline = Date.now() + WAIT_MS
  let shown = []
  while (!shown.length && Date.now() < deadline) {
    shown = await page.evaluate(async () => {
      const registration = await navigator.serviceWorker.ready
      const found = await registration.getNotifications()
      return found.map((n) => ({ title: n.title, body: n.body, tag: n.tag, data: n.data }))
    })
    if (!shown.length) await new Promise((resolve) => setTimeout(resolve, 50))
  }
  if (!shown.length) throw new Error(`no notification shown within ${WAIT_MS} ms`)
  process.stdout.write(`${JSON.stringify({ notifications: shown })}\n`)
} catch (err) {
  process.stdout.write(`${JSON.stringify({ error: String(err?.stack ?? err) })}\n`)
} finally {
  await browser.close()
}
