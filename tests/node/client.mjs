// A scripted session with Node's `ws`: frames (binary + meta), a question, a bad message.
// Usage: node client.mjs WS_URL frame0.png frame1.png ...   Prints every server event as a JSON line.
import { readFileSync } from "node:fs";
import WebSocket from "ws";

const [url, ...frames] = process.argv.slice(2);
const ws = new WebSocket(url);
const waiters = [];
ws.on("message", (data, isBinary) => {
  const ev = JSON.parse(data.toString());
  console.log(JSON.stringify(ev));
  for (const w of [...waiters]) if (w.pred(ev)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(ev); }
});
ws.on("close", (code) => { console.error(`closed ${code}`); });
const next = (pred) => new Promise((resolve) => waiters.push({ pred, resolve }));

ws.on("open", async () => {
  await next((ev) => ev.type === "session.created");
  ws.send(JSON.stringify({ type: "session.update", event_id: "u1", session: { fps: 2 } }));
  await next((ev) => ev.type === "session.updated" && ev.event_id === "u1");
  for (const [i, path] of frames.entries()) {
    ws.send(JSON.stringify({ type: "input_frame.meta", pts: i * 0.5, event_id: `f${i}` }));
    ws.send(readFileSync(path), { binary: true });
    await next((ev) => ev.type === "frame.ack" && ev.processed + ev.dropped + ev.sampled_out >= i + 1);
  }
  ws.send(JSON.stringify({ type: "question", text: "What do you see?", event_id: "q1" }));
  await next((ev) => ev.type === "response.done" && ev.event_id === "q1");
  ws.send(JSON.stringify({ type: "nope", event_id: "bad1" }));
  await next((ev) => ev.type === "error" && ev.event_id === "bad1");
  ws.close(1000);
});
