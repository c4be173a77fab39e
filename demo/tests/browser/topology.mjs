// Loads the operator's /topology page in headless Chromium and checks that it draws the demo's
// graph: client → reviews → reviews v1 / v2, every edge carrying traffic over mTLS, and the
// intruder's edge to reviews showing its requests denied. Saves a screenshot. Usage: node topology.mjs <page URL> <screenshot.png>
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node topology.mjs <page URL> <screenshot.png>");
  process.exit(64);
}

const EXPECTED = [
  ["workload:default/client", "service:reviews.default"],
  ["service:reviews.default", "subset:reviews.default/v1"],
  ["service:reviews.default", "subset:reviews.default/v2"],
];

const INTRUDER = ["workload:default/intruder", "service:reviews.default"];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = null;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const response = await page.goto(url);
  if (!response || response.status() !== 200) throw new Error(`GET ${url}: ${response && response.status()}`);

  // The page refreshes every 2 s; wait until every expected edge shows traffic.
  await page.waitForFunction((expected) => {
    const edges = [...document.querySelectorAll("svg g.edge")];
    return expected.every(([s, t]) => edges.some((e) =>
      e.dataset.source === s && e.dataset.target === t && Number(e.dataset.rps) > 0));
  }, EXPECTED, { timeout: 20000, polling: 250 });
  // The intruder's requests are denied by the access policy: its edge says so.
  await page.waitForFunction((intruder) => [...document.querySelectorAll("svg g.edge")].some((e) =>
    e.dataset.source === intruder[0] && e.dataset.target === intruder[1] && Number(e.dataset.denied) > 0),
  INTRUDER, { timeout: 20000, polling: 250 });

  const edges = await page.$$eval("svg g.edge", (gs) => gs.map((g) => ({
    source: g.dataset.source, target: g.dataset.target, rps: Number(g.dataset.rps),
    mtls: g.dataset.mtls === "true", denied: Number(g.dataset.denied),
    label: g.querySelector("text")?.textContent,
  })));
  const nodes = await page.$$eval("svg g.node", (gs) => gs.map((g) => g.dataset.id));
  const status = await page.textContent("#status");
  const rows = await page.$$eval("#edges tbody tr", (rs) => rs.length);
  console.log(JSON.stringify({ status, nodes, edges, rows }, null, 2));

  for (const [s, t] of EXPECTED) {
    const e = edges.find((e) => e.source === s && e.target === t);
    if (!e.mtls) throw new Error(`${s} → ${t} is not mTLS: ${e.label}`);
    if (!/req\/s/.test(e.label) || !/mTLS/.test(e.label)) throw new Error(`edge label: ${e.label}`);
  }
  const denied = edges.find((e) => e.source === INTRUDER[0] && e.target === INTRUDER[1]);
  if (!/denied\/s/.test(denied.label)) throw new Error(`the intruder's edge label: ${denied.label}`);
  for (const id of ["workload:default/client", "workload:default/intruder", "service:reviews.default"]) {
    if (!nodes.includes(id)) throw new Error(`node ${id} missing: ${nodes}`);
  }
  if (rows < EXPECTED.length) throw new Error(`the edge table has ${rows} rows`);
  if (!/proxies/.test(status)) throw new Error(`status line: ${status}`);
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);
} catch (e) {
  failed = e;
} finally {
  await browser.close();
}
if (failed) {
  console.error(`topology page check failed: ${failed.message}`);
  process.exit(1);
}
