// automerge-repo's own Node.js sync server, as automerge-repo-sync-server runs it: a Repo with
// file storage that shares nothing unasked, behind a WebSocket server. For the benchmark
// (bench.mjs). Usage: node sync-server.mjs DIR [DOCS]: with DOCS it first makes that many
// documents of 10 changes in its own storage. Prints {"port", "urls"} as one JSON line, then
// serves until killed.
import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import { WebSocketServer } from "ws"

const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(process.argv[2]),
  sharePolicy: async () => false,
})
const urls = []
for (let i = 0; i < Number(process.argv[3] ?? 0); i++) {
  const h = repo.create({ items: [] })
  for (let c = 1; c < 10; c++) h.change(d => d.items.push(`item ${c} of doc ${i}`))
  urls.push(h.url)
}
await repo.flush()
if (!wss.address()) await new Promise(r => wss.on("listening", r))
console.log(JSON.stringify({ port: wss.address().port, urls }))
