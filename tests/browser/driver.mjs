// Drives one headless Chromium page for the Python tests (tests/browser_driver.py).
//
// Debian's chromium is launched through playwright-core with a fresh user data dir, then
// commands arrive as JSON lines on stdin: {"id", "op", ...args}. Each is answered on
// stdout with {"id", "ok": true, "result"} or {"id", "ok": false, "error"}. Selectors
// are Playwright selectors (CSS, `role=button[name="Deny"]`, `:has-text()`, `>>`).
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

const OP_TIMEOUT_MS = Number(process.env.BROWSER_OP_TIMEOUT_MS || 5000);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "car-grpc-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 860 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
context.setDefaultTimeout(OP_TIMEOUT_MS);
const page = context.pages()[0] || (await context.newPage());
const pageErrors = [];
page.on("pageerror", (error) => pageErrors.push(String(error)));

const ops = {
  async goto({ url }) {
    const response = await page.goto(url);
    return { status: response ? response.status() : 0, url: page.url() };
  },
  async wait({ selector, state = "visible" }) {
    await page.locator(selector).first().waitFor({ state });
    return true;
  },
  async wait_count({ selector, count }) {
    await page.waitForFunction(
      ([sel, n]) => document.querySelectorAll(sel).length === n,
      [selector, count],
    );
    return count;
  },
  async count({ selector }) {
    return await page.locator(selector).count();
  },
  async texts({ selector }) {
    return await page.locator(selector).allInnerTexts();
  },
  async click({ selector }) {
    await page.locator(selector).click();
    return true;
  },
  async fill({ selector, value }) {
    await page.locator(selector).fill(value);
    await page.locator(selector).blur(); // leaving the field: its change event

    return true;
  },
  async press({ selector, key }) {
    const target = page.locator(selector);
    await target.focus();
    await page.keyboard.press(key);
    return true;
  },
  async focused() {
    return await page.evaluate(() => {
      const el = document.activeElement;
      return el ? { tag: el.tagName.toLowerCase(), text: el.textContent.trim() } : null;
    });
  },
  async evaluate({ expression }) {
    return await page.evaluate(expression);
  },
  async cookies() {
    return await context.cookies();
  },
  async clear_cookies() {
    await context.clearCookies();
    return true;
  },
  async screenshot({ path: file }) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    await page.screenshot({ path: file, fullPage: true });
    return file;
  },
  async page_errors() {
    return pageErrors;
  },
  async close() {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
    return true;
  },
};

const send = (message) => process.stdout.write(JSON.stringify(message) + "\n");
send({ ready: true, version: context.browser() ? context.browser().version() : "persistent" });

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { id, op, ...args } = JSON.parse(line);
  try {
    if (!(op in ops)) throw new Error(`unknown op: ${op}`);
    send({ id, ok: true, result: await ops[op](args) });
  } catch (error) {
    send({ id, ok: false, error: String(error && error.message ? error.message : error) });
  }
  if (op === "close") break;
}
process.exit(0);
