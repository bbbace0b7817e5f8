// Benchmark: a fresh JavaScript app (automerge-repo 2.x, WebSocket adapter) fetching N
// documents of 10 changes each, from tandemd versus from automerge-repo's own Node.js sync
// server (sync-server.mjs: file storage, as automerge-repo-sync-server runs), interleaved in
// one run. Run: `cargo build --release --bins && cd tests/js && npm install &&
// TANDEM_BIN_DIR=../../target/release node bench.mjs` (BENCH_DOCS=1000, BENCH_ROUNDS=3).

import { spawn } from "node:child_process"
import fs from "node:fs"
import os from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { Daemon, eventually } from "./daemons.mjs"

const here = path.dirname(fileURLToPath(import.meta.url))
const DOCS = Number(process.env.BENCH_DOCS ?? 1000)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3)
const CHANGES = 10

/** automerge-repo's sync server holding DOCS documents of CHANGES changes, made in it. */
async function jsServer() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "amr-server-"))
  const child = spawn("node", [path.join(here, "sync-server.mjs"), dir, String(DOCS)], {
    stdio: ["ignore", "pipe", "inherit"],
  })
  let out = ""
  const { port, urls } = await new Promise(resolve =>
    child.stdout.on("data", d => {
      out += d
      if (out.includes("\n")) resolve(JSON.parse(out))
    }),
  )
  return { url: `ws://127.0.0.1:${port}`, urls, stop: () => child.kill("SIGTERM"), pid: child.pid }
}

/** A Repo on `url` and its adapter. */
function client(url) {
  const adapter = new WebSocketClientAdapter(url)
  return { repo: new Repo({ network: [adapter] }), adapter }
}

/** Pushes DOCS documents of CHANGES changes to tandemd `d` from an app; returns their URLs
 * once the daemon lists them all. */
async function seed(d) {
  const { repo } = client(d.url)
  const urls = []
  for (let i = 0; i < DOCS; i++) {
    const h = repo.create({ items: [] })
    for (let c = 1; c < CHANGES; c++) h.change(x => x.items.push(`item ${c} of doc ${i}`))
    urls.push(h.url)
  }
  await eventually("tandemd to list every document", async () => (await d.api("GET", "/v1/docs")).length === DOCS, 600000)
  return { repo, urls }
}

/** Waits until a fresh app gets every document fully from `url` (the seeding has landed). */
async function settled(url, urls) {
  const start = Date.now()
  for (;;) {
    const { repo } = client(url)
    await repo.networkSubsystem.whenReady()
    const got = await Promise.allSettled(urls.map(u => repo.find(u)))
    const complete = got.filter(g => g.status === "fulfilled" && g.value.doc().items.length === CHANGES - 1)
    await repo.shutdown()
    if (complete.length === urls.length) return
    console.log(`  ${url}: ${complete.length} of ${urls.length} documents so far`)
    if (Date.now() - start > 600000) throw new Error(`only ${complete.length} of ${urls.length} documents arrived`)
    await new Promise(r => setTimeout(r, 1000))
  }
}

/** A fresh app fetches every document fully; returns the seconds it took. */
async function fetchAll(url, urls) {
  const { repo } = client(url)
  const start = performance.now()
  await repo.networkSubsystem.whenReady()
  const handles = await Promise.all(urls.map(u => repo.find(u)))
  await eventually("every document complete", () => handles.every(h => h.doc().items.length === CHANGES - 1), 600000)
  const secs = (performance.now() - start) / 1000
  await repo.shutdown()
  return secs
}

/** CPU seconds (user + system) a process has used so far, from /proc (100 ticks a second). */
function cpu(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ")
  return (Number(f[11]) + Number(f[12])) / 100
}

const median = xs => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const d = new Daemon(["--offline"])
await d.ready()
console.log(`seeding ${DOCS} documents x ${CHANGES} changes into each server ...`)
const js = await jsServer()
// Seeded when a fresh app gets every document from each (untimed).
const t = await seed(d)
await settled(d.url, t.urls)
await t.repo.shutdown()
await settled(js.url, js.urls)
const times = { tandemd: [], "automerge-repo": [] }
const cpus = { tandemd: [], "automerge-repo": [] }
for (let r = 0; r < ROUNDS; r++) {
  for (const [name, url, urls, pid] of [
    ["tandemd", d.url, t.urls, d.child.pid],
    ["automerge-repo", js.url, js.urls, js.pid],
  ]) {
    const c0 = cpu(pid)
    times[name].push(await fetchAll(url, urls))
    cpus[name].push(cpu(pid) - c0)
  }
}
for (const name of Object.keys(times)) {
  console.log(
    `${name.padEnd(15)} fetch ${DOCS} docs: median ${median(times[name]).toFixed(2)} s ` +
      `(${times[name].map(x => x.toFixed(2)).join(", ")}), server CPU ${median(cpus[name]).toFixed(2)} s`,
  )
}
console.log(`ratio tandemd / automerge-repo: ${(median(times.tandemd) / median(times["automerge-repo"])).toFixed(2)}`)
js.stop()
await d.stop()
process.exit(0)
