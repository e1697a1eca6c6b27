// wsbroadcast.js without a network: an injected WebSocket constructor plays the server.
// Run by tests/test_jsclient.py (node --test); these need no browser and no server.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const wsb = require(path.join(__dirname, "..", "..", "wsbroadcast", "static", "wsbroadcast.js"));

/** A stand-in for the browser's WebSocket: records what the client sends, lets a test answer. */
function fakeNetwork() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.extensions = "";
      sockets.push(this);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code, reason) { this.drop(code || 1005, reason || ""); }
    // ---- the test's side
    open() { this.readyState = 1; this.onopen && this.onopen({}); }
    deliver(obj) { this.onmessage && this.onmessage({ data: JSON.stringify(obj) }); }
    drop(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose && this.onclose({ code: code, reason: reason || "" });
    }
    frames(type) { return this.sent.filter((f) => f.type === type); }
  }
  return { sockets, FakeSocket };
}

function waitFor(pred, what, timeout = 5000) {
  const deadline = Date.now() + timeout;
  return new Promise((resolve, reject) => {
    (function poll() {
      let v;
      try { v = pred(); } catch (e) { reject(e); return; }
      if (v) { resolve(v); return; }
      if (Date.now() > deadline) { reject(new Error("timed out waiting for " + what)); return; }
      setTimeout(poll, 2);
    })();
  });
}

function client(net, extra) {
  const c = new wsb.Client("ws://broker.test/ws", Object.assign({
    WebSocket: net.FakeSocket, fetch: null, window: null, navigator: null,
    minDelay: 5, maxDelay: 40, random: () => 1,
  }, extra || {}));
  c.states = [];
  c.gaps = [];
  c.on("state", (e) => c.states.push(e));
  c.on("gap", (g) => c.gaps.push(g));
  return c;
}

/** Answer the subscribe frames of socket `s` that have not been answered, with `ack(frame)`. */
function ackSubscribes(s, ack) {
  for (const f of s.frames("subscribe")) {
    if (f.answered) continue;
    f.answered = true;
    s.deliver(Object.assign({ type: "ack", id: f.id, topic: f.topic }, ack(f)));
  }
}

test("backoffDelay grows by the factor from minDelay up to maxDelay, jittered down by at most half", () => {
  const o = { minDelay: 100, maxDelay: 1000, factor: 2, jitter: 0.5 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => wsb.backoffDelay(n, o, () => 1)), [100, 200, 400, 800, 1000, 1000]);
  assert.deepEqual([0, 1, 4].map((n) => wsb.backoffDelay(n, o, () => 0)), [50, 100, 500]);
  for (let i = 0; i < 200; i++) {
    const d = wsb.backoffDelay(3, o);
    assert.ok(d >= 400 && d <= 800, String(d));
  }
  assert.equal(wsb.backoffDelay(5000, o, () => 1), 1000);  // no overflow to Infinity or NaN
});

test("failed attempts back off exponentially; a connection that lasted starts again from minDelay", async () => {
  const net = fakeNetwork();
  const c = client(net, { minDelay: 4, maxDelay: 32, stableAfter: 30 }).connect();
  await waitFor(() => net.sockets.length === 1, "the first attempt");
  for (let i = 0; i < 5; i++) {
    net.sockets[i].drop(1006);   // refused before opening
    await waitFor(() => net.sockets.length === i + 2, "attempt " + (i + 2));
  }
  const delays = c.states.filter((e) => e.state === "disconnected").map((e) => e.delay);
  assert.deepEqual(delays, [4, 8, 16, 32, 32]);
  const s = net.sockets[5];
  s.open();
  await waitFor(() => c.state === "connected", "connected");
  const opened = Date.now();
  await waitFor(() => Date.now() - opened >= 35, "a stable connection");
  s.drop(1001, "going away");
  await waitFor(() => net.sockets.length === 7, "the reconnect");
  const last = c.states.filter((e) => e.state === "disconnected").pop();
  assert.equal(last.delay, 4);
  assert.equal(last.code, 1001);
  assert.equal(last.reason, "going away");
  assert.equal(last.reconnect, true);
  assert.deepEqual(net.sockets[0].protocols, ["wsbroadcast.v1"]);
  c.close();
});

test("every concrete topic resumes with since and epoch; a pattern resubscribes without", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  const got = [];
  c.subscribe("news.eu", (m) => got.push(["eu", m.seq, m.data]));
  c.subscribe("news.*", (m) => got.push(["*", m.topic, m.seq]));
  await waitFor(() => net.sockets.length === 1, "a socket");
  const s1 = net.sockets[0];
  s1.open();
  assert.deepEqual(s1.frames("subscribe").map((f) => [f.topic, f.since]), [["news.eu", undefined], ["news.*", undefined]]);
  ackSubscribes(s1, (f) => (f.topic === "news.eu" ? { seq: 5, epoch: "E1", recovered: true } : {}));
  s1.deliver({ type: "message", topic: "news.eu", seq: 6, data: "six" });
  s1.deliver({ type: "message", topic: "news.us", seq: 40, data: "us" });
  assert.deepEqual(got, [["eu", 6, "six"], ["*", "news.eu", 6], ["*", "news.us", 40]]);
  assert.deepEqual(c.positions(), { "news.eu": { seq: 6, epoch: "E1" } });   // none for a pattern's topics
  s1.drop(1006);
  await waitFor(() => net.sockets.length === 2, "the reconnect");
  const s2 = net.sockets[1];
  s2.open();
  const frames = s2.frames("subscribe");
  assert.deepEqual(frames.map((f) => [f.topic, f.since, f.epoch]),
                   [["news.eu", 6, "E1"], ["news.*", undefined, undefined]]);
  assert.equal(c.subscriptions().every((x) => x.status === "pending"), true);
  ackSubscribes(s2, (f) => (f.topic === "news.eu" ? { seq: 8, epoch: "E1", recovered: true } : {}));
  assert.equal(c.subscriptions().every((x) => x.status === "active"), true);
  assert.deepEqual(c.gaps, []);
  c.close();
});

test("duplicates are dropped by seq: a replay overlapping what arrived, a message twice", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  const got = [];
  c.subscribe("t", (m) => got.push(m.seq));
  await waitFor(() => net.sockets.length === 1, "a socket");
  const s1 = net.sockets[0];
  s1.open();
  ackSubscribes(s1, () => ({ seq: 0, epoch: "E", recovered: true }));
  for (const seq of [1, 2, 2, 3, 1]) s1.deliver({ type: "message", topic: "t", seq: seq, data: seq });
  s1.drop(1006);
  await waitFor(() => net.sockets.length === 2, "the reconnect");
  const s2 = net.sockets[1];
  s2.open();
  assert.equal(s2.frames("subscribe")[0].since, 3);
  ackSubscribes(s2, () => ({ seq: 5, epoch: "E", recovered: true }));
  for (const seq of [2, 3, 4, 5, 4, 6]) s2.deliver({ type: "message", topic: "t", seq: seq, data: seq });
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
  c.close();
});

test("recovered: false on a new epoch is a gap event, and the new numbering is delivered from 1", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  const got = [];
  const sub = c.subscribe("t", (m) => got.push(m.seq));
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].open();
  ackSubscribes(net.sockets[0], () => ({ seq: 7, epoch: "OLD", recovered: true }));
  assert.deepEqual(await sub.ready, { topic: "t", seq: 7, epoch: "OLD", recovered: true });
  net.sockets[0].deliver({ type: "message", topic: "t", seq: 8, data: 8 });
  net.sockets[0].drop(1006);
  await waitFor(() => net.sockets.length === 2, "the reconnect");
  const s2 = net.sockets[1];
  s2.open();
  assert.deepEqual([s2.frames("subscribe")[0].since, s2.frames("subscribe")[0].epoch], [8, "OLD"]);
  ackSubscribes(s2, () => ({ seq: 2, epoch: "NEW", recovered: false }));
  s2.deliver({ type: "message", topic: "t", seq: 1, data: 1 });
  s2.deliver({ type: "message", topic: "t", seq: 2, data: 2 });
  assert.deepEqual(got, [8, 1, 2]);
  assert.equal(c.gaps.length, 1);
  assert.deepEqual(c.gaps[0], { topic: "t", since: 8, seq: 2, epoch: "NEW", previousEpoch: "OLD", epochChanged: true });
  assert.deepEqual(c.positions().t, { seq: 2, epoch: "NEW" });
  c.close();
});

test("a resume point the server refuses (bad_request) is a gap; the topic is subscribed again from now", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  c.subscribe("t", () => {});
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].open();
  ackSubscribes(net.sockets[0], () => ({ seq: 9, epoch: "E", recovered: true }));
  net.sockets[0].drop(1006);
  await waitFor(() => net.sockets.length === 2, "the reconnect");
  const s2 = net.sockets[1];
  s2.open();
  const first = s2.frames("subscribe")[0];
  assert.equal(first.since, 9);
  s2.deliver({ type: "error", id: first.id, code: "bad_request", message: "since is past the latest seq" });
  const again = s2.frames("subscribe")[1];
  assert.equal(again.topic, "t");
  assert.equal(again.since, undefined);
  assert.equal(c.gaps.length, 1);
  assert.equal(c.gaps[0].reason, "since is past the latest seq");
  c.close();
});

test("publish resolves with the ack, rejects with the server's code, and with disconnected when the link drops", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  const queued = c.publish("a", { n: 1 });   // held until connected
  await waitFor(() => net.sockets.length === 1, "a socket");
  const s = net.sockets[0];
  s.open();
  const [p1] = s.frames("publish");
  assert.deepEqual([p1.topic, p1.data], ["a", { n: 1 }]);
  s.deliver({ type: "ack", id: p1.id, topic: "a", seq: 3, epoch: "E" });
  assert.deepEqual(await queued, { topic: "a", seq: 3, epoch: "E" });
  const refused = c.publish("b", 2);
  const p2 = s.frames("publish")[1];
  s.deliver({ type: "error", id: p2.id, code: "forbidden", message: "not allowed to publish on b" });
  await assert.rejects(refused, (e) => e.code === "forbidden" && e.message === "not allowed to publish on b");
  const lost = c.publish("a", 3);
  s.drop(1006);
  await assert.rejects(lost, (e) => e.code === "disconnected");
  c.close();
  await assert.rejects(c.publish("a", 4), (e) => e.code === "disconnected");
});

test("a refused subscribe rejects its ready promise and is forgotten", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  const sub = c.subscribe("secret", () => {});
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].open();
  const f = net.sockets[0].frames("subscribe")[0];
  net.sockets[0].deliver({ type: "error", id: f.id, code: "forbidden", message: "not allowed to subscribe to secret" });
  await assert.rejects(sub.ready, (e) => e.code === "forbidden");
  assert.deepEqual(c.subscriptions(), []);
  assert.deepEqual(errors, ["forbidden"]);
  c.close();
});

test("1008 token expired stops the reconnects without getToken", async () => {
  const net = fakeNetwork();
  const c = client(net, { token: "T1" }).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  assert.equal(net.sockets[0].url, "ws://broker.test/ws?token=T1");
  net.sockets[0].open();
  net.sockets[0].drop(1008, "token expired");
  const last = c.states[c.states.length - 1];
  assert.deepEqual([last.state, last.code, last.reason, last.reconnect], ["disconnected", 1008, "token expired", false]);
  await new Promise((r) => setTimeout(r, 50));   // ten times the back-off: nothing may be tried
  assert.equal(net.sockets.length, 1);
  c.setToken("T2");
  await waitFor(() => net.sockets.length === 2, "the reconnect with the new token");
  assert.equal(net.sockets[1].url, "ws://broker.test/ws?token=T2");
  c.close();
});

test("getToken renews an expired token at once, and the topic resumes where it was", async () => {
  const net = fakeNetwork();
  let calls = 0;
  const c = client(net, { getToken: () => Promise.resolve("fresh-" + (++calls)) }).connect();
  const got = [];
  c.subscribe("t", (m) => got.push(m.seq));
  await waitFor(() => net.sockets.length === 1, "a socket");
  assert.equal(calls, 1);   // no token given: asked for one first
  assert.equal(net.sockets[0].url, "ws://broker.test/ws?token=fresh-1");
  net.sockets[0].open();
  ackSubscribes(net.sockets[0], () => ({ seq: 4, epoch: "E", recovered: true }));
  net.sockets[0].deliver({ type: "message", topic: "t", seq: 5, data: 5 });
  net.sockets[0].drop(1008, "token expired");
  await waitFor(() => net.sockets.length === 2, "the reconnect");
  assert.equal(calls, 2);
  const s2 = net.sockets[1];
  assert.equal(s2.url, "ws://broker.test/ws?token=fresh-2");
  s2.open();
  assert.deepEqual([s2.frames("subscribe")[0].since, s2.frames("subscribe")[0].epoch], [5, "E"]);
  c.close();
});

test("a failed handshake with a token asks /stats why: 401 stops, anything else backs off", async () => {
  const net = fakeNetwork();
  const asked = [];
  let answer = 503;
  const fetch = (url) => {
    asked.push(url);
    return Promise.resolve({ status: answer, json: () => Promise.resolve({ error: "unauthorized", message: "token expired" }) });
  };
  const c = client(net, { token: "T", fetch: fetch }).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].drop(1006);
  await waitFor(() => net.sockets.length === 2, "a retry after a 503");
  assert.deepEqual(asked, ["http://broker.test/stats?token=T"]);
  answer = 401;
  net.sockets[1].drop(1006);
  await waitFor(() => c.states.some((e) => e.code === 401), "the stop");
  const last = c.states[c.states.length - 1];
  assert.deepEqual([last.state, last.code, last.reason, last.reconnect], ["disconnected", 401, "token expired", false]);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(net.sockets.length, 2);
  c.close();
});

test("a failed handshake from a page the server refuses (403 forbidden_origin) stops the reconnects", async () => {
  const net = fakeNetwork();
  const fetch = () => Promise.resolve({ status: 403, json: () => Promise.resolve({ error: "forbidden_origin", message: "origin not allowed" }) });
  const c = client(net, { fetch: fetch }).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].drop(1006);
  await waitFor(() => c.states.some((e) => e.code === 403), "the stop");
  const last = c.states[c.states.length - 1];
  assert.deepEqual([last.state, last.reason, last.reconnect], ["disconnected", "origin not allowed", false]);
  await new Promise((r) => setTimeout(r, 50));   // ten times the back-off: nothing may be tried
  assert.equal(net.sockets.length, 1);
  await assert.rejects(c.publish("a", 1), (e) => e.code === "disconnected");
  c.connect();   // asked to try again, it does
  await waitFor(() => net.sockets.length === 2, "the new attempt");
  c.close();
});

test("a failed probe (server away, or a 403 of another kind) keeps the back-off going", async () => {
  const net = fakeNetwork();
  let n = 0;
  const fetch = () => (++n === 1 ? Promise.reject(new TypeError("Failed to fetch"))
    : Promise.resolve({ status: 403, json: () => Promise.resolve({ error: "forbidden", message: "loopback only" }) }));
  const c = client(net, { fetch: fetch }).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].drop(1006);
  await waitFor(() => net.sockets.length === 2, "a retry after a failed probe");
  net.sockets[1].drop(1006);
  await waitFor(() => net.sockets.length === 3, "a retry after a 403 forbidden");
  assert.equal(n, 2);
  c.close();
});

test("while offline the back-off waits for the online event", async () => {
  const net = fakeNetwork();
  const listeners = {};
  const win = { addEventListener: (n, f) => { listeners[n] = f; }, removeEventListener: (n) => { delete listeners[n]; } };
  const nav = { onLine: true };
  const c = client(net, { window: win, navigator: nav }).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].open();
  nav.onLine = false;
  net.sockets[0].drop(1006);
  const last = c.states[c.states.length - 1];
  assert.deepEqual([last.state, last.offline, last.reconnect], ["disconnected", true, true]);
  await new Promise((r) => setTimeout(r, 50));   // ten times the back-off
  assert.equal(net.sockets.length, 1);
  nav.onLine = true;
  listeners.online();
  assert.equal(net.sockets.length, 2);
  c.close();
  assert.equal(listeners.online, undefined);
});

test("close() ends it: no reconnect, state disconnected with reconnect false", async () => {
  const net = fakeNetwork();
  const c = client(net).connect();
  await waitFor(() => net.sockets.length === 1, "a socket");
  net.sockets[0].open();
  c.close();
  assert.equal(net.sockets[0].readyState, 3);
  const last = c.states[c.states.length - 1];
  assert.deepEqual([last.state, last.reconnect], ["disconnected", false]);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(net.sockets.length, 1);
});

test("matches and isPattern follow the broker's rule", () => {
  assert.equal(wsb.matches("a.*", "a.b"), true);
  assert.equal(wsb.matches("a.*", "a.b.c"), false);
  assert.equal(wsb.matches("a.>", "a.b.c"), true);
  assert.equal(wsb.matches("a.>", "a"), false);
  assert.equal(wsb.matches("a", "a"), true);
  assert.equal(wsb.isPattern("a.>"), true);
  assert.equal(wsb.isPattern("a.b"), false);
});
