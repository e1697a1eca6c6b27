// wsbroadcast.js against a real broker, over node's own WebSocket (node 22, or node 20 with
// --experimental-websocket). tests/test_jsclient.py starts the broker and sets WSB_URL.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const net = require("node:net");
const path = require("node:path");
const wsb = require(path.join(__dirname, "..", "..", "wsbroadcast", "static", "wsbroadcast.js"));

const URL_ = process.env.WSB_URL;
const HTTP = URL_ ? URL_.replace(/^ws/, "http").replace(/\/ws$/, "") : null;
const skip = !URL_ ? "WSB_URL is not set (run through tests/test_jsclient.py)"
  : (typeof WebSocket === "undefined" ? "this node has no WebSocket (node 22, or 20 with --experimental-websocket)" : false);

function waitFor(pred, what, timeout = 10000) {
  const deadline = Date.now() + timeout;
  return new Promise((resolve, reject) => {
    (function poll() {
      const v = pred();
      if (v) { resolve(v); return; }
      if (Date.now() > deadline) { reject(new Error("timed out waiting for " + what)); return; }
      setTimeout(poll, 5);
    })();
  });
}

function httpPublish(topic, data) {
  return fetch(HTTP + "/publish", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ topic, data }),
  }).then((r) => r.json());
}

test("publish and subscribe on a real broker: acks, order, the server's error codes", { skip }, async () => {
  const c = wsb.connect(URL_, { minDelay: 20 });
  const got = [];
  const sub = c.subscribe("node.rt", (m) => got.push([m.seq, m.data]));
  const ack = await sub.ready;
  assert.equal(ack.recovered, true);
  assert.equal(typeof ack.epoch, "string");
  const first = await c.publish("node.rt", { n: 1 });
  assert.equal(first.topic, "node.rt");
  assert.equal(first.seq, ack.seq + 1);
  assert.equal(first.epoch, ack.epoch);
  await c.publish("node.rt", "two");
  await waitFor(() => got.length === 2, "two messages");
  assert.deepEqual(got, [[first.seq, { n: 1 }], [first.seq + 1, "two"]]);
  await assert.rejects(c.publish("bad topic", 1), (e) => e.code === "bad_topic" && e.message.length > 0);
  await assert.rejects(c.publish("node.*", 1), (e) => e.code === "bad_topic");
  await assert.rejects(c.subscribe("a..b").ready, (e) => e.code === "bad_topic");
  c.close();
});

test("resume on a real broker: what was published while away arrives in order, once", { skip }, async () => {
  const c = wsb.connect(URL_, { minDelay: 20 });
  const got = [];
  const gaps = [];
  c.on("gap", (g) => gaps.push(g));
  await c.subscribe("node.resume", (m) => got.push(m.seq)).ready;
  const a = await c.publish("node.resume", 1);
  await waitFor(() => got.length === 1, "the first message");
  c.close();
  for (let i = 0; i < 3; i++) await httpPublish("node.resume", "away " + i);
  c.connect();
  await waitFor(() => got.length === 4, "the messages published while away");
  const live = await c.publish("node.resume", "live");
  await waitFor(() => got.length === 5, "the live message");
  assert.deepEqual(got, [a.seq, a.seq + 1, a.seq + 2, a.seq + 3, live.seq]);
  assert.equal(live.seq, a.seq + 4);
  assert.deepEqual(gaps, []);
  c.close();
});

function closedPort() {   // a port that was free a moment ago: nothing listens there
  return new Promise((resolve) => {
    const srv = net.createServer().listen(0, "127.0.0.1", () => {
      const port = srv.address().port;
      srv.close(() => resolve(port));
    });
  });
}

test("back-off against a port where nothing listens: the delays double up to maxDelay", { skip }, async () => {
  for (const port of [await closedPort(), 9]) {   // 9: a port fetch refuses outright (no close event in node)
    await backoffAgainst(port);
  }
});

async function backoffAgainst(port) {
  const c = wsb.connect("ws://127.0.0.1:" + port + "/ws", { minDelay: 10, maxDelay: 80, random: () => 1 });
  const delays = [];
  c.on("state", (e) => { if (e.state === "disconnected") delays.push(e.delay); });
  await waitFor(() => delays.length >= 5, "five failed attempts");
  c.close();
  assert.deepEqual(delays.slice(0, 5), [10, 20, 40, 80, 80]);
}

test("presence on a real broker: presence(), presenceStats(), join and leave events", { skip }, async () => {
  const a = wsb.connect(URL_, { minDelay: 20 });
  const events = [];
  a.on("join", (e) => events.push(["join", e.topic, e.client.conn]));
  a.on("leave", (e) => events.push(["leave", e.topic, e.client.conn]));
  await a.subscribe("node.room", null, { joinLeave: true }).ready;
  const b = wsb.connect(URL_, { minDelay: 20 });
  await b.subscribe("node.room").ready;
  await waitFor(() => events.length === 1, "a join");
  const p = await a.presence("node.room");
  assert.equal(p.total, 2);
  assert.equal(p.clients.length, 2);
  assert.equal(p.clients[1].conn, events[0][2]);
  assert.equal(typeof p.clients[0].joined, "number");
  assert.deepEqual(await b.presenceStats("node.room"), { clients: 2, users: 0 });
  await assert.rejects(a.presence("node.*"), (e) => e.code === "bad_topic");
  b.close();
  await waitFor(() => events.length === 2, "a leave");
  assert.deepEqual(events[1], ["leave", "node.room", events[0][2]]);
  assert.equal((await a.presence("node.room")).total, 1);
  a.close();
});
