// Real tandemd processes for the JavaScript tests: fresh data dirs, loopback only, no mDNS.
// The binaries come from TANDEM_BIN_DIR, else the workspace's target/debug (build first:
// `cargo build --bins`).

import { spawn, execFileSync } from "node:child_process"
import fs from "node:fs"
import os from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const here = path.dirname(fileURLToPath(import.meta.url))
const binDir = process.env.TANDEM_BIN_DIR ?? path.join(here, "..", "..", "target", "debug")

export const sleep = ms => new Promise(r => setTimeout(r, ms))

/** Polls `f` until it returns a truthy value (returned), or fails after `ms` naming `what`. */
export async function eventually(what, f, ms = 30000) {
  const start = Date.now()
  let last
  while (Date.now() - start < ms) {
    try {
      const v = await f()
      if (v) return v
    } catch (e) {
      last = e
    }
    await sleep(50)
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last}` : ""}`)
}

export class Daemon {
  constructor(extra = []) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "tandem-js-"))
    this.extra = extra
    this.start()
  }

  start() {
    fs.rmSync(path.join(this.dir, "api.json"), { force: true })
    const log = fs.openSync(`${this.dir}.log`, "a")
    this.child = spawn(
      path.join(binDir, "tandemd"),
      ["--data-dir", this.dir, "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-mdns", ...this.extra],
      { env: { ...process.env, XDG_CONFIG_HOME: path.join(this.dir, "no-config") }, stdio: ["ignore", "ignore", log] },
    )
  }

  /** Waits until the API answers; returns its address. */
  async ready() {
    return eventually("tandemd to serve its API", async () => {
      const { addr } = JSON.parse(fs.readFileSync(path.join(this.dir, "api.json"), "utf8"))
      const r = await fetch(`http://${addr}/v1/health`)
      return r.ok && addr
    })
  }

  get addr() {
    return JSON.parse(fs.readFileSync(path.join(this.dir, "api.json"), "utf8")).addr
  }

  get token() {
    return fs.readFileSync(path.join(this.dir, "api-token"), "utf8").trim()
  }

  /** The automerge-repo endpoint's URL (with the token, as a Node.js or browser app uses it). */
  get url() {
    return `ws://${this.addr}/v1/automerge-repo?token=${this.token}`
  }

  /** Runs the CLI on this daemon; returns its stdout (trimmed); throws on a non-zero exit. */
  cli(...args) {
    return execFileSync(path.join(binDir, "tandem"), ["--data-dir", this.dir, ...args], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    }).trim()
  }

  /** The HTTP API with the bearer token. */
  async api(method, route, body) {
    const r = await fetch(`http://${this.addr}${route}`, {
      method,
      headers: { authorization: `Bearer ${this.token}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    })
    const text = await r.text()
    if (!r.ok) throw new Error(`${method} ${route}: ${r.status} ${text}`)
    return text ? JSON.parse(text) : null
  }

  /** A JavaScript app's Repo connected to this daemon, and its adapter. */
  repo() {
    const adapter = new WebSocketClientAdapter(this.url, 500)
    const repo = new Repo({ network: [adapter] })
    return { repo, adapter }
  }

  async stop() {
    if (this.child.exitCode !== null) return
    const done = new Promise(r => this.child.once("exit", r))
    this.child.kill("SIGTERM")
    await done
  }
}

/** Two daemons, B joined to A; resolves once both are up and paired. */
export async function pair() {
  const a = new Daemon()
  const b = new Daemon()
  await a.ready()
  await b.ready()
  b.cli("join", a.cli("invite"))
  return [a, b]
}
