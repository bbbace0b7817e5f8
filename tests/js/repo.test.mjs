// automerge-repo apps against real tandemd processes: the JavaScript client (@automerge/
// automerge-repo 2.x with its WebSocket adapter) on daemon A, the CLI on daemon B, and QUIC
// between them. Run: `cargo build --bins && cd tests/js && npm install && npm test`
// (`cargo test` runs it too: tests/tests/apps.rs).

import { after, before, describe, test } from "node:test"
import assert from "node:assert/strict"
import * as A from "@automerge/automerge"
import { cbor } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import WebSocket from "ws"
import { execFileSync } from "node:child_process"
import fs from "node:fs"
import path from "node:path"
import { fileURLToPath } from "node:url"
import { Daemon, eventually, pair, sleep } from "./daemons.mjs"

/** The JSON the CLI shows for a document on daemon `d`, or null if it has not arrived. */
function cliJson(d, id) {
  try {
    return JSON.parse(d.cli("doc", "get", id, "--json"))
  } catch {
    return null
  }
}

describe("an automerge-repo app on tandemd", () => {
  let a, b
  const apps = []
  const app = d => {
    const x = d.repo()
    apps.push(x)
    return x
  }

  before(async () => {
    ;[a, b] = await pair()
  })

  after(async () => {
    for (const { repo } of apps) await repo.shutdown().catch(() => {})
    await a?.stop()
    await b?.stop()
  })

  test("a document made in JS reaches the other daemon and its CLI", async () => {
    const { repo } = app(a)
    const handle = repo.create({ title: "from js", items: ["milk"] })
    const id = handle.documentId
    await eventually("A to list the JS document", async () =>
      (await a.api("GET", "/v1/docs")).some(d => d.id === id),
    )
    const seen = await eventually("B's CLI to read it", () => cliJson(b, id))
    assert.deepEqual(seen, { title: "from js", items: ["milk"] })
    // The URL form names the same document.
    assert.deepEqual(cliJson(b, handle.url), seen)
  })

  test("a document made with the CLI on B is found by a JS app on A", async () => {
    const id = b.cli("doc", "new", JSON.stringify({ n: 7, text: "hello" }))
    await eventually("the document to reach A", () => cliJson(a, id))
    const { repo } = app(a)
    const handle = await repo.find(`automerge:${id}`)
    assert.deepEqual(JSON.parse(JSON.stringify(handle.doc())), { n: 7, text: "hello" })
  })

  test("a request for a document nobody has is answered unavailable, then served when it arrives", async () => {
    const { repo } = app(a)
    const id = b.cli("doc", "new", JSON.stringify({ late: true }))
    // B's document has not been sent to A yet only if we are quick; either way find works:
    // unavailable first, then the daemon sends it once it arrives.
    let handle
    try {
      handle = await repo.find(`automerge:${id}`)
    } catch {
      await eventually("the document to reach A", () => cliJson(a, id))
      handle = await repo.find(`automerge:${id}`)
    }
    await eventually("the late document's contents", () => handle.doc()?.late === true)
  })

  test("live: CLI edits on B reach the JS handle on A, JS edits reach B, concurrent text converges", async () => {
    const { repo } = app(a)
    const { repo: repoB } = app(b)
    const handle = repo.create({ text: "hello world", n: 0 })
    const id = handle.documentId
    await eventually("B to have it", () => cliJson(b, id))
    const changed = new Promise(resolve =>
      handle.on("change", ({ doc }) => {
        if (doc.n === 5) resolve()
      }),
    )
    b.cli("doc", "put", id, "/n", "5")
    await changed
    handle.change(d => {
      d.items = ["from js"]
    })
    await eventually("B's CLI to see the JS edit", () => cliJson(b, id)?.items?.[0] === "from js")
    // Two apps, one on each daemon, edit the same text at once.
    const handleB = await repoB.find(handle.url)
    handle.change(d => A.splice(d, ["text"], 0, 0, "A: "))
    handleB.change(d => A.splice(d, ["text"], handleB.doc().text.length, 0, " :B"))
    const want = "A: hello world :B"
    await eventually("both apps to converge", () => handle.doc().text === want && handleB.doc().text === want)
    await eventually("both daemons to converge", () => cliJson(a, id)?.text === want && cliJson(b, id)?.text === want)
  })

  test("an app that edits offline converges when it reconnects", async () => {
    const { repo, adapter } = app(a)
    const handle = repo.create({ list: [] })
    const id = handle.documentId
    await eventually("B to have it", () => cliJson(b, id))
    repo.networkSubsystem.removeNetworkAdapter(adapter) // closes its socket
    handle.change(d => d.list.push("offline edit"))
    b.cli("doc", "put", id, "/list/-", JSON.stringify("edit on B meanwhile"))
    await sleep(500)
    assert.deepEqual(cliJson(b, id).list, ["edit on B meanwhile"], "nothing reached B while offline")
    repo.networkSubsystem.addNetworkAdapter(new WebSocketClientAdapter(a.url, 500))
    await eventually("the offline edit to reach B", () => cliJson(b, id)?.list?.length === 2)
    await eventually("B's edit to reach the app", () => handle.doc().list.length === 2)
    assert.deepEqual([...handle.doc().list].sort(), [...cliJson(b, id).list].sort())
  })

  test("Date, Counter and bytes read through the API and CLI as documented, and back", async () => {
    const { repo } = app(a)
    const handle = repo.create({
      when: new Date("2026-12-06T05:17:45.123Z"),
      likes: new A.Counter(3),
      blob: new Uint8Array([104, 105, 33]),
    })
    const id = handle.documentId
    const doc = await eventually("B to have it", () => cliJson(b, id))
    assert.deepEqual(doc, { when: "2026-12-06T05:17:45.123Z", likes: 3, blob: [104, 105, 33] })
    await b.api("PUT", `/v1/docs/${id}?path=/likes`, { $increment: 2 })
    await b.api("PUT", `/v1/docs/${id}?path=/due`, { $timestamp: "2027-01-01T00:00:00.000Z" })
    await eventually("the increment and the timestamp to reach the app", () => handle.doc().due !== undefined && handle.doc().likes.value === 5)
    const d = handle.doc()
    assert.ok(d.likes instanceof A.Counter, "still a Counter")
    assert.equal(d.likes.value, 5)
    assert.ok(d.due instanceof Date, "a Date")
    assert.equal(d.due.toISOString(), "2027-01-01T00:00:00.000Z")
    // Concurrent increments add up.
    handle.change(d => d.likes.increment(10))
    await b.api("PUT", `/v1/docs/${id}?path=/likes`, { $increment: 100 })
    await eventually("increments to add up", () => handle.doc().likes.value === 115 && cliJson(b, id)?.likes === 115)
  })

  test("the README's app example works as written", async () => {
    const here = path.dirname(fileURLToPath(import.meta.url))
    const readme = fs.readFileSync(path.join(here, "..", "..", "README.md"), "utf8")
    const block = readme.split("<!-- js-example -->")[1].split("<!-- /js-example -->")[0]
    const code = block.replace(/^\s*```js\n/, "").replace(/```\s*$/, "")
    const file = path.join(here, ".readme-app.mjs") // here, so its imports resolve
    fs.writeFileSync(file, code)
    try {
      const run = (...args) =>
        execFileSync("node", [file, ...args], { encoding: "utf8", env: { ...process.env, TANDEM_DATA_DIR: a.dir } })
      const url = run().split("\n").find(l => l.startsWith("automerge:"))
      assert.ok(url, "it prints the document's URL")
      await eventually("B to have the example's document", () => cliJson(b, url)?.items?.length === 1)
      assert.deepEqual(cliJson(b, url), { title: "groceries", items: ["milk"] })
      run(url)
      await eventually("the second run's edit on B", () => cliJson(b, url)?.items?.length === 2)
    } finally {
      fs.rmSync(file, { force: true })
    }
  })

  test("ephemeral messages reach the daemon's other apps that have the document open", async () => {
    const one = app(a)
    const two = app(a)
    const handle = one.repo.create({ presence: true })
    await eventually("A to have it", () => cliJson(a, handle.documentId))
    const other = await two.repo.find(handle.url)
    const got = new Promise(resolve => other.on("ephemeral-message", ({ message }) => resolve(message)))
    // Sent until the other app's subscription is surely in place.
    const timer = setInterval(() => handle.broadcast({ cursor: 42 }), 200)
    try {
      assert.deepEqual(await got, { cursor: 42 })
    } finally {
      clearInterval(timer)
    }
  })
})

describe("the automerge-repo endpoint refuses what it must", () => {
  let d
  before(async () => {
    d = new Daemon(["--app-origin", "http://localhost:5173"])
    await d.ready()
  })
  after(async () => {
    await d?.stop()
  })

  /** Opens a raw socket; resolves with "open" or the HTTP status of a refused upgrade. */
  function open(url, options = {}) {
    return new Promise(resolve => {
      const ws = new WebSocket(url, options.protocols ?? [], options)
      ws.on("open", () => resolve({ ws, status: "open" }))
      ws.on("unexpected-response", (_req, res) => resolve({ status: res.statusCode }))
      ws.on("error", e => resolve({ status: `error ${e.message}` }))
    })
  }

  test("wrong token, missing token, a foreign Origin, a foreign Host", async () => {
    const base = `ws://${d.addr}/v1/automerge-repo`
    assert.equal((await open(`${base}?token=wrong`)).status, 401)
    assert.equal((await open(base)).status, 401)
    assert.equal((await open(`${base}?token=${d.token}`, { origin: "https://evil.example" })).status, 403)
    assert.equal((await open(`${base}?token=${d.token}`, { headers: { host: `evil.example:${d.addr.split(":")[1]}` } })).status, 403)
    // Allowed: the configured origin, this listener's own, no Origin (not a browser), and the
    // token as a subprotocol (what a browser can send).
    for (const opts of [{ origin: "http://localhost:5173" }, { origin: `http://${d.addr}` }, {}]) {
      const r = await open(`${base}?token=${d.token}`, opts)
      assert.equal(r.status, "open", JSON.stringify(opts))
      r.ws.close()
    }
    const viaProtocol = await open(base, { protocols: [`tandem-token.${d.token}`] })
    assert.equal(viaProtocol.status, "open")
    assert.equal(viaProtocol.ws.protocol, `tandem-token.${d.token}`)
    viaProtocol.ws.close()
  })

  /** Resolves with the close code and reason once the server closes `ws`. */
  const closed = ws => new Promise(resolve => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })))

  test("garbage CBOR and an oversized frame close that socket only", async () => {
    const url = `ws://${d.addr}/v1/automerge-repo?token=${d.token}`
    const { repo } = d.repo()
    const handle = repo.create({ before: 1 })
    await eventually("the healthy app's document to arrive", () => d.api("GET", `/v1/docs/${handle.documentId}`).catch(() => null))

    const garbage = (await open(url)).ws
    const garbageClosed = closed(garbage)
    garbage.send(Buffer.from([0xff, 0x00, 0x13, 0x37]))
    const g = await garbageClosed
    assert.equal(g.code, 1008)
    assert.match(g.reason, /CBOR/)

    const notJoined = (await open(url)).ws
    const notJoinedClosed = closed(notJoined)
    notJoined.send(cbor.encode({ type: "sync", senderId: "x", targetId: "y", documentId: handle.documentId, data: new Uint8Array([1]) }))
    assert.match((await notJoinedClosed).reason, /join/)

    // A joined app that sends a huge ephemeral message (each relayed copy is held in memory).
    const noisy = (await open(url)).ws
    const noisyClosed = closed(noisy)
    noisy.send(cbor.encode({ type: "join", senderId: "noisy", peerMetadata: {}, supportedProtocolVersions: ["1"] }))
    noisy.send(
      cbor.encode({
        type: "ephemeral",
        senderId: "noisy",
        targetId: "tandemd",
        documentId: handle.documentId,
        count: 1,
        sessionId: "s",
        data: new Uint8Array(100 * 1024),
      }),
    )
    assert.match((await noisyClosed).reason, /ephemeral/)

    const big = (await open(url)).ws
    const bigClosed = closed(big)
    big.send(Buffer.alloc(65 * 1024 * 1024, 0x41))
    const c = await bigClosed
    assert.notEqual(c.code, 1000, "closed for the size")

    // The healthy app and the daemon carry on.
    handle.change(d => {
      d.after = 2
    })
    await eventually("the healthy app's next edit", async () => (await d.api("GET", `/v1/docs/${handle.documentId}`))?.after === 2)
    await repo.shutdown()
  })
})
