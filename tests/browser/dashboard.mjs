// Drives hangar's dashboard in a real Chromium, as a person would, and prints what it
// saw as JSON on stdout. The Rust end-to-end test (crates/cli/tests/it/dashboard.rs)
// prepares the server, runs this, and checks both the observations and the server's
// state afterwards. Inputs come from the environment:
//   HANGAR_URL, HANGAR_KEY   the server and a key to sign in with
//   APP                      the app to work on
//   RECREATE_TO, ROLLING_TO  revisions to roll back to, in that order
//   DELETE                   a non-current revision to delete
//   GATEWAY_URL              the gateway, to call the app while the charts are watched
//   SCREENSHOTS              a directory for screenshots of the main pages (optional)
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("HANGAR_URL");
const app = env("APP");
const shots = process.env.SCREENSHOTS;
const seen = {};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(30000);
  await page.goto(url + "/");

  // Sign in with the keyboard.
  await page.getByLabel("API key").fill(env("HANGAR_KEY"));
  await page.keyboard.press("Enter");
  await page.getByRole("link", { name: app }).waitFor();
  seen.apps = await page.locator("main table tbody tr td:first-child").allInnerTexts();
  if (shots) await page.screenshot({ path: `${shots}/apps.png` });

  await page.getByRole("link", { name: app }).click();
  await page.locator("#versions").waitFor();
  const rows = async () => page.locator("#versions tbody tr").evaluateAll((trs) => trs.map((tr) => ({
    id: tr.dataset.revision,
    status: tr.querySelector("[data-status]")?.dataset.status,
    current: !!tr.querySelector(".badge.current"),
    traffic: tr.querySelector(".traffic")?.innerText.trim(),
    annotations: [...tr.querySelectorAll(".annotation")].map((a) => a.innerText),
    rollback: !!tr.querySelector("button.rollback"),
    delete: !!tr.querySelector("button.delete"),
  })));
  seen.versions = await rows();
  seen.guard = await page.locator("#guard").innerText();
  if (shots) await page.screenshot({ path: `${shots}/versions.png`, fullPage: true });

  const row = (id) => page.locator(`#versions tr[data-revision="${id}"]`);
  const rollBack = async (id, strategy, shot) => {
    await row(id).getByRole("button", { name: "Rollback" }).click();
    await page.getByRole("radio", { name: strategy === "recreate" ? /Recreate/ : /Rolling/ }).check();
    if (shot) await page.screenshot({ path: `${shots}/rollback-dialog.png` });
    await page.locator("#confirm-ok").click();
    await row(id).locator(".badge.current").waitFor();
  };
  await rollBack(env("RECREATE_TO"), "recreate", !!shots);
  await rollBack(env("ROLLING_TO"), "rolling", false);
  seen.after_rollbacks = await rows();

  await row(env("DELETE")).getByRole("button", { name: "Delete" }).click();
  await page.locator("#confirm-ok").click();
  await row(env("DELETE")).waitFor({ state: "detached" });
  seen.after_delete = await rows();

  // A graceful rollout: the live Runners view shows new runner ids.
  const runnerIds = async () => page.locator("#runners tr[data-runner]").evaluateAll((trs) => trs.map((tr) => tr.dataset.runner));
  await page.locator("#runners tr[data-runner]").first().waitFor();
  seen.runners_before = await runnerIds();
  seen.runner_gpus = await page.locator("#runners tr[data-runner] td.gpus").allInnerTexts();
  // A runner's output, live: its health checks keep adding lines.
  await page.locator("#runners tr[data-runner] button.show-runner-log").first().click();
  const logLines = async () => (await page.locator("#runner-log pre").innerText()).split("\n").filter((l) => l).length;
  await page.locator("#runner-log pre", { hasText: "listening on" }).waitFor();
  const first = await logLines();
  const logDeadline = Date.now() + 30000;
  while ((await logLines()) <= first) {
    if (Date.now() > logDeadline) throw new Error("the runner's log view did not grow");
    await page.waitForTimeout(200);
  }
  seen.runner_log = await page.locator("#runner-log pre").innerText();
  await page.getByRole("button", { name: "Rollout…" }).click();
  await page.getByRole("radio", { name: /Graceful/ }).check();
  await page.locator("#confirm-ok").click();
  const deadline = Date.now() + 30000;
  for (;;) {
    const ids = await runnerIds();
    if (ids.length > 0 && ids.every((id) => !seen.runners_before.includes(id))) { seen.runners_after = ids; break; }
    if (Date.now() > deadline) throw new Error(`runner ids did not change: ${ids}`);
    await page.waitForTimeout(200);
  }
  // The charts draw the app's last hour; while the app is called, the latest numbers
  // (read again every few seconds) show the calls.
  await page.locator("#charts figure.chart svg path.line").first().waitFor();
  const numbers = async () => page.locator("#charts figure.chart").evaluateAll((figures) => Object.fromEntries(
    figures.map((f) => [f.dataset.chart, Object.fromEntries([...f.querySelectorAll(".latest")].map((n) =>
      [n.dataset.series, n.dataset.value === "" ? null : Number(n.dataset.value)]))])));
  let calling = true;
  const caller = (async () => {
    while (calling) {
      await fetch(`${env("GATEWAY_URL")}/default/${app}/`, { headers: { Authorization: `Key ${env("HANGAR_KEY")}` } })
        .then((r) => r.arrayBuffer()).catch(() => {});
      await new Promise((done) => setTimeout(done, 20));
    }
  })();
  const chartsDeadline = Date.now() + 30000;
  for (;;) {
    const shown = await numbers();
    const calls = Object.entries(shown.calls || {}).filter(([name]) => name.endsWith("calls/s"));
    if (calls.some(([, v]) => v > 0) && shown.latency?.["p95 ms"] > 0) break;
    if (Date.now() > chartsDeadline) throw new Error(`the charts' numbers stayed at zero: ${JSON.stringify(shown)}`);
    await page.waitForTimeout(200);
  }
  calling = false;
  await caller;
  seen.charts = await page.locator("#charts figure.chart").evaluateAll((figures) => figures.map((f) => ({
    chart: f.dataset.chart,
    lines: f.querySelectorAll("svg path.line").length,
    points: f.querySelectorAll("svg circle.point").length,
    segments: Math.max(0, ...[...f.querySelectorAll("svg path.line")].map((p) => p.getAttribute("d").split("L").length - 1)),
  })));
  seen.chart_numbers = await numbers();
  if (shots) await page.locator("section[aria-labelledby=charts-title]").screenshot({ path: `${shots}/charts.png` });
  seen.history = await page.locator("#history tbody tr td:nth-child(2)").allInnerTexts();
  if (shots) await page.screenshot({ path: `${shots}/app.png`, fullPage: true });
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
