/*! wsbroadcast.js: the browser (and node) client of the wsbroadcast broker, protocol v1.
 *
 * Served by the broker at /wsbroadcast.js; no build step, no dependency.
 *   classic script:  <script src="/wsbroadcast.js"></script>  ->  window.wsbroadcast
 *   ES module:       import { connect } from "/wsbroadcast.mjs";
 *   node (CommonJS): const wsbroadcast = require("./wsbroadcast.js");
 *
 *   var client = wsbroadcast.connect("ws://127.0.0.1:8080/ws", { token: TOKEN });
 *   client.on("state", function (ev) { ... });    // connecting / connected / disconnected
 *   client.subscribe("news.>", function (msg) { ... msg.topic, msg.seq, msg.data });
 *   client.publish("news.eu", { title: "hi" }).then(function (r) { ... r.seq, r.epoch });
 *   client.subscribe("room.1", onMsg, { joinLeave: true });   // "join" / "leave" events
 *   client.presence("room.1").then(function (p) { ... p.total, p.clients });
 *
 * It reconnects with jittered exponential back-off, resumes every concrete topic with
 * `since` + `epoch` (PROTOCOL.md section 6), drops duplicates by seq, and reports what
 * could not be recovered as a "gap" event. It stops on refused credentials (401, 1008
 * "token expired") until `getToken` gives a new token, and waits while the page is offline.
 * MIT License, as the rest of wsbroadcast.
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  } else {
    root.wsbroadcast = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : (typeof self !== "undefined" ? self : this), function () {
  "use strict";

  var SUBPROTOCOL = "wsbroadcast.v1";
  var VERSION = "1.0";
  var OPEN = 1;
  var DEFAULTS = {
    minDelay: 500,        // ms before the first reconnect attempt (before jitter)
    maxDelay: 20000,      // ms, the back-off's ceiling
    factor: 2,            // growth per failed attempt
    jitter: 0.5,          // a delay is drawn from [base * (1 - jitter), base]
    stableAfter: 5000,    // ms a connection must last for the back-off to start again from minDelay
    publishTimeout: 10000, // ms a publish may wait for its ack (queued while connecting included)
    maxQueued: 1000       // publishes held while not connected
  };

  // ------------------------------------------------------------------ pure helpers

  /** True when a topic pattern has a wildcard token (`*` or `>`). */
  function isPattern(topic) {
    var parts = String(topic).split(".");
    for (var i = 0; i < parts.length; i++) {
      if (parts[i] === "*" || parts[i] === ">") return true;
    }
    return false;
  }

  /** The broker's matching rule: `*` one token, `>` (last) one or more. */
  function matches(pattern, topic) {
    var p = String(pattern).split("."), t = String(topic).split(".");
    for (var i = 0; i < p.length; i++) {
      if (p[i] === ">") return i === p.length - 1 && t.length > i;
      if (i >= t.length || (p[i] !== "*" && p[i] !== t[i])) return false;
    }
    return p.length === t.length;
  }

  /** The delay (ms) before reconnect attempt number `attempt` (0 first). */
  function backoffDelay(attempt, opts, random) {
    var o = opts || DEFAULTS;
    var base = Math.min(o.maxDelay, o.minDelay * Math.pow(o.factor, Math.min(attempt, 64)));
    var r = (random || Math.random)();
    return Math.round(base * (1 - o.jitter) + r * base * o.jitter);
  }

  /** An Error with the server's (or the client's) error code. */
  function WsbroadcastError(code, message) {
    var err = new Error(message || code);
    err.name = "WsbroadcastError";
    err.code = code;
    return err;
  }

  function withToken(url, token) {
    if (!token) return url;
    return url + (url.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  /** The URL of GET /stats next to a WebSocket URL (where a refused token can be told apart). */
  function statsUrl(url) {
    var m = /^(ws|wss):\/\/([^\/?#]+)/i.exec(url);
    if (!m) return null;
    return (m[1].toLowerCase() === "wss" ? "https" : "http") + "://" + m[2] + "/stats";
  }

  function handled(promise) {       // a promise nobody may catch must not log "unhandled rejection"
    promise["catch"](function () {});
    return promise;
  }

  // ------------------------------------------------------------------ the client

  /**
   * A client of one broker. Options: token, getToken (returns a token or a Promise of one),
   * protocol (the subprotocol offered, default "wsbroadcast.v1"), minDelay, maxDelay, factor,
   * jitter, stableAfter, publishTimeout, maxQueued; for tests and other hosts: WebSocket (a
   * constructor), fetch, random, window (online/offline events), navigator (onLine).
   */
  function Client(url, options) {
    if (typeof url !== "string" || !/^wss?:\/\//i.test(url)) {
      throw new TypeError("wsbroadcast: the URL must start with ws:// or wss:// (got " + String(url) + ")");
    }
    var o = options || {};
    this.url = url;
    this.options = {};
    for (var k in DEFAULTS) this.options[k] = (o[k] !== undefined ? o[k] : DEFAULTS[k]);
    this.protocol = o.protocol || SUBPROTOCOL;
    this.token = o.token || null;
    this.getToken = typeof o.getToken === "function" ? o.getToken : null;
    this._WebSocket = o.WebSocket || (typeof WebSocket !== "undefined" ? WebSocket : null);
    this._fetch = o.fetch !== undefined ? o.fetch
      : (typeof fetch !== "undefined" ? function (u, init) { return fetch(u, init); } : null);
    this._random = o.random || Math.random;
    this._window = o.window !== undefined ? o.window : (typeof window !== "undefined" ? window : null);
    this._navigator = o.navigator !== undefined ? o.navigator : (typeof navigator !== "undefined" ? navigator : null);
    this._statsUrl = o.statsUrl !== undefined ? o.statsUrl : statsUrl(url);
    if (!this._WebSocket) throw new TypeError("wsbroadcast: no WebSocket here; pass options.WebSocket");

    this.state = "disconnected";
    /** Sec-WebSocket-Extensions of the current connection ("" when none or not connected) */
    this.extensions = "";
    this._listeners = {};
    this._ws = null;
    this._nextId = 1;
    this._subs = {};          // pattern -> {pattern, handlers, status, ack, ready, resolve, reject}
    this._order = [];         // patterns in subscription order
    this._positions = {};     // concrete topic -> {seq, epoch} (resume point and dedupe floor)
    this._pending = {};       // id -> {kind, ...} awaiting an ack or error
    this._queue = [];         // publishes waiting for a connection
    this._attempt = 0;
    this._timer = null;
    this._openedAt = 0;
    this._stopped = true;     // true after close() or refused credentials
    this._waitingOnline = false;
    this._tokenRenewing = false;
    this._renewals = 0;       // token renewals since the last connection that opened
    var self = this;
    this._onOnline = function () {
      if (self._waitingOnline) {
        self._waitingOnline = false;
        self._attempt = 0;
        self._open();
      }
    };
  }

  var P = Client.prototype;

  // ---- events
  /** Listen: "state" ({state, code, reason, reconnect, delay}), "subscribed" (an ack, or {topic, seq,
   * epoch, granted: true} for a subscription granted by the token), "gap", "error", "message",
   * "join" and "leave" ({topic, client: {conn, sub, joined}}; for subscriptions with joinLeave). */
  P.on = function (name, fn) {
    (this._listeners[name] || (this._listeners[name] = [])).push(fn);
    return this;
  };

  P.off = function (name, fn) {
    var l = this._listeners[name];
    if (l) {
      var i = l.indexOf(fn);
      if (i >= 0) l.splice(i, 1);
    }
    return this;
  };

  P._emit = function (name, ev) {
    var l = (this._listeners[name] || []).slice();
    for (var i = 0; i < l.length; i++) {
      try { l[i](ev); } catch (e) { this._report(e); }
    }
  };

  P._report = function (e) {        // an application callback threw: do not break the client
    if (typeof setTimeout !== "undefined") setTimeout(function () { throw e; }, 0);
  };

  P._setState = function (state, extra) {
    this.state = state;
    var ev = { state: state };
    if (extra) for (var k in extra) ev[k] = extra[k];
    this._emit("state", ev);
  };

  // ---- connection lifecycle
  /** (Re)start connecting, e.g. after close() or after refused credentials and setToken(). */
  P.connect = function () {
    if (this._stopped && this._window && this._window.addEventListener) {
      this._window.addEventListener("online", this._onOnline);   // removed again by close()
    }
    this._stopped = false;
    this._attempt = 0;
    this._clearTimer();
    this._waitingOnline = false;
    if (this._ws) return this;
    var self = this;
    // on the next tick, so that listeners and subscriptions added right after are in place
    Promise.resolve().then(function () {
      if (self._stopped || self._ws || self._tokenRenewing) return;
      if (!self.token && self.getToken) self._renewToken(null);
      else self._open();
    });
    return this;
  };

  /** Use this token from the next connection on (and reconnect when stopped for want of one). */
  P.setToken = function (token) {
    this.token = token || null;
    if (this._stopped && this._stoppedForAuth) this.connect();
    return this;
  };

  /** Close for good: no reconnect; queued and unanswered publishes are rejected. */
  P.close = function () {
    this._stopped = true;
    this._clearTimer();
    this._waitingOnline = false;
    var ws = this._ws;
    this._ws = null;
    this._failPending("closed", "the client was closed");
    if (ws) {
      try { ws.close(1000, "client closed"); } catch (e) { /* already closing */ }
    }
    if (this._window && this._window.removeEventListener) {
      this._window.removeEventListener("online", this._onOnline);
    }
    this._setState("disconnected", { code: 1000, reason: "client closed", reconnect: false });
  };

  P._clearTimer = function () {
    if (this._timer !== null) { clearTimeout(this._timer); this._timer = null; }
  };

  P._open = function () {
    if (this._stopped || this._ws) return;
    var self = this;
    var ws;
    this._setState("connecting", { attempt: this._attempt });
    try {
      ws = new this._WebSocket(withToken(this.url, this.token), [this.protocol]);
    } catch (e) {
      this._scheduleReconnect(1006, String(e && e.message || e), false);
      return;
    }
    this._ws = ws;
    this._openedAt = 0;
    ws.onopen = function () { if (self._ws === ws) self._onOpen(); };
    ws.onmessage = function (ev) {
      if (self._ws !== ws) return;
      if (typeof ev.data === "string") self._onFrame(ev.data);
    };
    ws.onerror = function () {
      // a browser fires close right after; node's WebSocket may not (a port fetch refuses
      // stays CONNECTING for ever): a socket still not open or closed by then is given up
      setTimeout(function () {
        if (self._ws === ws && (ws.readyState === 3 || self._openedAt === 0)) {
          self._ws = null;
          try { ws.close(); } catch (e) { /* not open */ }
          self._onClose(1006, "");
        }
      }, 0);
    };
    ws.onclose = function (ev) {
      if (self._ws !== ws) return;
      self._ws = null;
      self._onClose(ev && ev.code || 1006, ev && ev.reason || "");
    };
  };

  P._onOpen = function () {
    this._openedAt = Date.now();
    this.extensions = this._ws && this._ws.extensions || "";
    this._stoppedForAuth = false;
    this._renewals = 0;
    this._setState("connected", {});
    // every position of a topic only a wildcard follows is dropped: no replay can repeat it
    var keep = {};
    for (var i = 0; i < this._order.length; i++) {
      var p = this._order[i];
      if (!isPattern(p) && this._positions.hasOwnProperty(p)) keep[p] = this._positions[p];
    }
    this._positions = keep;
    for (var j = 0; j < this._order.length; j++) this._sendSubscribe(this._subs[this._order[j]]);
    var queued = this._queue;
    this._queue = [];
    for (var q = 0; q < queued.length; q++) this._sendPublish(queued[q]);
  };

  P._onClose = function (code, reason) {
    var wasOpen = this._openedAt !== 0;
    var lasted = wasOpen ? Date.now() - this._openedAt : 0;
    this._openedAt = 0;
    this.extensions = "";
    // acks of this connection will never come: subscriptions are sent again, publishes fail
    for (var id in this._pending) {
      var p = this._pending[id];
      if (p.kind === "publish") {
        clearTimeout(p.timer);
        p.reject(WsbroadcastError("disconnected", "the connection closed before the ack of this " +
                                  "publish: it may or may not have been published"));
      }
    }
    this._pending = {};
    for (var k = 0; k < this._order.length; k++) this._subs[this._order[k]].status = "pending";
    if (this._stopped) return;
    if (wasOpen && lasted >= this.options.stableAfter) this._attempt = 0;
    if (code === 1008 && /token/i.test(reason)) {
      this._authRefused(code, reason);
      return;
    }
    if (!wasOpen && this._fetch && this._statsUrl) {
      this._probe(code, reason);
      return;
    }
    this._scheduleReconnect(code, reason, true);
  };

  /**
   * After a handshake that failed (a browser does not say why): ask GET /stats, with the token,
   * whether the server refuses the token (401), the page's origin or the host name (403).
   */
  P._probe = function (code, reason) {
    var self = this;
    var done = false;
    function decide(status, body) {
      if (done) return;
      done = true;
      if (self._stopped || self._ws) return;
      if (status === 401) {
        self._authRefused(401, body && body.message || "unauthorized");
      } else if (status === 403 && body && (body.error === "forbidden_host" || body.error === "forbidden_origin")) {
        self._stop(403, body.message || "forbidden_host");
      } else {
        self._scheduleReconnect(code, reason, true);
      }
    }
    var url = withToken(this._statsUrl, this.token);
    var req;
    try {
      req = this._fetch(url, { cache: "no-store", credentials: "omit" });
    } catch (e) {
      decide(0, null);
      return;
    }
    Promise.resolve(req).then(function (res) {
      if (res.status === 401 || res.status === 403) {
        return res.json().then(function (b) { decide(res.status, b); }, function () { decide(res.status, null); });
      }
      decide(res.status, null);
    }, function () { decide(0, null); });
  };

  P._stop = function (code, reason) {
    this._stopped = true;
    this._failQueued("disconnected", "not connected: " + reason);
    this._setState("disconnected", { code: code, reason: reason, reconnect: false });
  };

  P._authRefused = function (code, reason) {
    if (this.getToken && !this._tokenRenewing) {
      this._setState("disconnected", { code: code, reason: reason, reconnect: true, delay: 0 });
      this._renewToken({ code: code, reason: reason });
      return;
    }
    this._stoppedForAuth = true;
    this._stop(code, reason);
  };

  P._renewToken = function (why) {
    var self = this;
    this._tokenRenewing = true;
    var got;
    try {
      got = Promise.resolve(this.getToken(why));
    } catch (e) {
      got = Promise.reject(e);
    }
    got.then(function (token) {
      self._tokenRenewing = false;
      if (self._stopped && !self._stoppedForAuth && why !== null) return;
      if (!token) {
        self._stoppedForAuth = true;
        self._stop(why ? why.code : 401, "getToken gave no token");
        return;
      }
      self.token = token;
      // the first renewal reconnects at once; a new token refused again goes through the back-off
      var again = why !== null && self._renewals > 0;
      if (why !== null) self._renewals++;
      self._stopped = false;
      if (again) self._scheduleReconnect(why.code, why.reason, true);
      else self._open();
    }, function (err) {
      self._tokenRenewing = false;
      self._stoppedForAuth = true;
      self._stop(why ? why.code : 401, "getToken failed: " + String(err && err.message || err));
    });
  };

  P._scheduleReconnect = function (code, reason, counted) {
    this._clearTimer();
    var nav = this._navigator;
    if (nav && nav.onLine === false && this._window) {
      this._waitingOnline = true;     // the back-off waits for the "online" event
      this._setState("disconnected", { code: code, reason: reason, reconnect: true, offline: true });
      return;
    }
    var delay = backoffDelay(this._attempt, this.options, this._random);
    if (counted) this._attempt++;
    var self = this;
    this._setState("disconnected", { code: code, reason: reason, reconnect: true, delay: delay });
    this._timer = setTimeout(function () {
      self._timer = null;
      if (nav && nav.onLine === false && self._window) {
        self._scheduleReconnect(code, reason, false);
        return;
      }
      self._open();
    }, delay);
  };

  // ---- sending
  P._send = function (obj) {
    var ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(obj));
    return true;
  };

  P._sendSubscribe = function (sub) {
    var id = this._nextId++;
    var frame = { type: "subscribe", topic: sub.pattern, id: id };
    if (sub.joinLeave) frame.join_leave = true;
    var pos = this._positions[sub.pattern];
    var since = null;
    if (!isPattern(sub.pattern) && pos) {
      since = pos.seq;
      frame.since = since;
      if (pos.epoch !== undefined && pos.epoch !== null) frame.epoch = pos.epoch;
    }
    sub.status = "pending";
    this._pending[id] = { kind: "subscribe", pattern: sub.pattern, since: since, epoch: pos ? pos.epoch : null };
    if (!this._send(frame)) delete this._pending[id];
  };

  /**
   * Subscribe to a topic or pattern; `onMessage({topic, seq, data})` gets every message, in seq
   * order per topic, each once. Returns {topic, ready (a Promise of the ack), unsubscribe()}.
   * `options.joinLeave` (a concrete topic): the topic's joins and leaves come as events.
   */
  P.subscribe = function (pattern, onMessage, options) {
    if (typeof pattern !== "string" || !pattern) throw new TypeError("wsbroadcast: subscribe needs a topic or pattern");
    var self = this;
    var sub = this._subs[pattern];
    if (!sub) {
      sub = { pattern: pattern, handlers: [], status: "pending", ack: null,
              joinLeave: !!(options && options.joinLeave) };
      sub.ready = handled(new Promise(function (resolve, reject) { sub.resolve = resolve; sub.reject = reject; }));
      this._subs[pattern] = sub;
      this._order.push(pattern);
      if (this._ws && this._ws.readyState === OPEN) this._sendSubscribe(sub);
    }
    if (typeof onMessage === "function") sub.handlers.push(onMessage);
    return {
      topic: pattern,
      ready: sub.ready,
      unsubscribe: function () { self.unsubscribe(pattern, onMessage); }
    };
  };

  /** Remove `onMessage` (or every handler) from a subscription; the last one unsubscribes. */
  P.unsubscribe = function (pattern, onMessage) {
    var sub = this._subs[pattern];
    if (!sub) return;
    if (typeof onMessage === "function") {
      var i = sub.handlers.indexOf(onMessage);
      if (i >= 0) sub.handlers.splice(i, 1);
      if (sub.handlers.length) return;
    }
    this._dropSub(pattern);
    var id = this._nextId++;
    this._pending[id] = { kind: "unsubscribe", pattern: pattern };
    if (!this._send({ type: "unsubscribe", topic: pattern, id: id })) delete this._pending[id];
  };

  P._dropSub = function (pattern) {
    delete this._subs[pattern];
    var i = this._order.indexOf(pattern);
    if (i >= 0) this._order.splice(i, 1);
    delete this._positions[pattern];    // subscribed again later, it starts from the latest
  };

  /** Publish any JSON value; a Promise of {topic, seq, epoch}, rejected with {code, message}. */
  P.publish = function (topic, data) {
    var self = this;
    if (data === undefined) data = null;
    return new Promise(function (resolve, reject) {
      var item = { topic: topic, data: data, resolve: resolve, reject: reject, timer: null, id: null };
      item.timer = setTimeout(function () {
        var qi = self._queue.indexOf(item);
        if (qi >= 0) self._queue.splice(qi, 1);
        if (item.id !== null) delete self._pending[item.id];
        reject(WsbroadcastError("timeout", "no ack for the publish on " + topic + " within " +
                                self.options.publishTimeout + " ms"));
      }, self.options.publishTimeout);
      if (self._ws && self._ws.readyState === OPEN) {
        self._sendPublish(item);
      } else if (self._stopped) {
        clearTimeout(item.timer);
        reject(WsbroadcastError("disconnected", "not connected"));
      } else if (self._queue.length >= self.options.maxQueued) {
        clearTimeout(item.timer);
        reject(WsbroadcastError("disconnected", "not connected, and " + self.options.maxQueued +
                                " publishes already wait for the connection"));
      } else {
        self._queue.push(item);
      }
    });
  };

  P._sendPublish = function (item) {
    var id = this._nextId++;
    item.id = id;
    item.kind = "publish";
    this._pending[id] = item;
    try {
      this._send({ type: "publish", topic: item.topic, data: item.data, id: id });
    } catch (e) {       // e.g. data that JSON cannot encode
      delete this._pending[id];
      clearTimeout(item.timer);
      item.reject(WsbroadcastError("bad_request", String(e && e.message || e)));
    }
  };

  P._failQueued = function (code, message) {
    var queued = this._queue;
    this._queue = [];
    for (var i = 0; i < queued.length; i++) {
      clearTimeout(queued[i].timer);
      queued[i].reject(WsbroadcastError(code, message));
    }
  };

  P._failPending = function (code, message) {
    this._failQueued(code, message);
    for (var id in this._pending) {
      var p = this._pending[id];
      if (p.kind === "publish") {
        clearTimeout(p.timer);
        p.reject(WsbroadcastError(code, message));
      } else if (p.kind === "presence") {
        p.reject(WsbroadcastError(code, message));
      }
    }
    this._pending = {};
  };

  // ---- presence
  /** Who is subscribed to `topic`: a Promise of {total, clients: [{conn, sub, joined}]} (1000 at most). */
  P.presence = function (topic) {
    return this._ask({ type: "presence", topic: topic });
  };

  /** How many are subscribed to `topic`: a Promise of {clients, users} (users: distinct subs). */
  P.presenceStats = function (topic) {
    return this._ask({ type: "presence_stats", topic: topic });
  };

  P._ask = function (frame) {
    var self = this;
    return new Promise(function (resolve, reject) {
      if (!(self._ws && self._ws.readyState === OPEN)) {
        reject(WsbroadcastError("disconnected", "not connected"));
        return;
      }
      var id = self._nextId++;
      frame.id = id;
      self._pending[id] = { kind: "presence", resolve: resolve, reject: reject };
      if (!self._send(frame)) {
        delete self._pending[id];
        reject(WsbroadcastError("disconnected", "not connected"));
      }
    });
  };

  P._onAnswer = function (f) {
    var p = this._pending[f.id];
    if (!p || p.kind !== "presence") return;
    delete this._pending[f.id];
    p.resolve(f.type === "presence" ? { total: f.total, clients: f.clients }
                                     : { clients: f.clients, users: f.users });
  };

  P._onGranted = function (f) {       // a subscription granted by the token, on every connect
    if (typeof f.topic !== "string") return;
    var info = { topic: f.topic, granted: true };
    if (typeof f.seq === "number") {
      info.seq = f.seq;
      info.epoch = f.epoch;
      var pos = this._positions[f.topic];
      if (pos && pos.epoch === f.epoch && f.seq > pos.seq) {
        this._emit("gap", { topic: f.topic, since: pos.seq, seq: f.seq, epoch: f.epoch,
                            previousEpoch: pos.epoch, epochChanged: false, granted: true });
      }
      this._positions[f.topic] = { seq: f.seq, epoch: f.epoch };
    }
    this._emit("subscribed", info);
  };

  // ---- receiving
  P._onFrame = function (text) {
    var f;
    try { f = JSON.parse(text); } catch (e) { return; }
    if (f === null || typeof f !== "object") return;
    if (f.type === "message") this._onMessage(f);
    else if (f.type === "ack") this._onAck(f);
    else if (f.type === "error") this._onError(f);
    else if (f.type === "join" || f.type === "leave") this._emit(f.type, { topic: f.topic, client: f.client });
    else if (f.type === "presence" || f.type === "presence_stats") this._onAnswer(f);
    else if (f.type === "subscribed") this._onGranted(f);
  };

  P._onMessage = function (f) {
    var topic = f.topic, seq = f.seq;
    if (typeof topic !== "string" || typeof seq !== "number") return;
    // positions are kept for the concrete topics subscribed (a pattern's topics are not
    // resumed, and a connection delivers each message once): memory stays bounded
    var pos = this._positions[topic];
    if (pos) {
      if (seq <= pos.seq) return;                           // a duplicate
      pos.seq = seq;
    }
    var msg = { topic: topic, seq: seq, data: f.data };
    this._emit("message", msg);
    for (var i = 0; i < this._order.length; i++) {
      var sub = this._subs[this._order[i]];
      if (!matches(sub.pattern, topic)) continue;
      var hs = sub.handlers.slice();
      for (var j = 0; j < hs.length; j++) {
        try { hs[j](msg); } catch (e) { this._report(e); }
      }
    }
  };

  P._onAck = function (f) {
    var p = this._pending[f.id];
    if (!p) return;
    delete this._pending[f.id];
    if (p.kind === "publish") {
      clearTimeout(p.timer);
      p.resolve({ topic: f.topic, seq: f.seq, epoch: f.epoch });
      return;
    }
    if (p.kind !== "subscribe") return;
    var sub = this._subs[p.pattern];
    if (!sub) return;                                        // unsubscribed meanwhile
    sub.status = "active";
    var info = { topic: p.pattern };
    if (!isPattern(p.pattern) && typeof f.seq === "number") {
      info.seq = f.seq;
      info.epoch = f.epoch;
      info.recovered = f.recovered !== false;
      var pos = this._positions[p.pattern];
      var epochChanged = !!pos && pos.epoch !== null && f.epoch !== undefined && f.epoch !== pos.epoch;
      if (p.since !== null) {
        // a replay of every stored message after `since` follows (all of them on a new epoch)
        if (epochChanged) pos.seq = 0;
        if (pos) pos.epoch = f.epoch;
        if (f.recovered === false) {
          this._emit("gap", { topic: p.pattern, since: p.since, seq: f.seq, epoch: f.epoch,
                              previousEpoch: p.epoch, epochChanged: epochChanged });
        }
      } else if (!pos || epochChanged || pos.epoch === null || f.seq > pos.seq) {
        this._positions[p.pattern] = { seq: (pos && !epochChanged) ? Math.max(pos.seq, f.seq) : f.seq,
                                       epoch: f.epoch };
      }
    }
    sub.ack = info;
    this._emit("subscribed", info);
    sub.resolve(info);
  };

  P._onError = function (f) {
    var p = f.id !== undefined ? this._pending[f.id] : undefined;
    var err = WsbroadcastError(f.code, f.message);
    if (!p) { this._emit("error", err); return; }
    delete this._pending[f.id];
    if (p.kind === "presence") {
      p.reject(err);
      return;
    }
    if (p.kind === "publish") {
      clearTimeout(p.timer);
      p.reject(err);
      return;
    }
    if (p.kind === "subscribe") {
      var sub = this._subs[p.pattern];
      if (!sub) return;
      if (p.since !== null && f.code === "bad_request") {
        // the resume point is not valid on this server any more: start from its latest seq
        delete this._positions[p.pattern];
        this._emit("gap", { topic: p.pattern, since: p.since, seq: null, epoch: null,
                            previousEpoch: p.epoch, epochChanged: false, reason: f.message });
        this._sendSubscribe(sub);
        return;
      }
      this._dropSub(p.pattern);
      err.topic = p.pattern;
      this._emit("error", err);
      sub.reject(err);
      return;
    }
    this._emit("error", err);
  };

  // ---- introspection
  /** The resume point of every concrete topic: {topic: {seq, epoch}}. */
  P.positions = function () {
    var out = {};
    for (var t in this._positions) out[t] = { seq: this._positions[t].seq, epoch: this._positions[t].epoch };
    return out;
  };

  /** The subscriptions, in order: [{topic, status ("pending" | "active"), ack}]. */
  P.subscriptions = function () {
    var out = [];
    for (var i = 0; i < this._order.length; i++) {
      var s = this._subs[this._order[i]];
      out.push({ topic: s.pattern, status: s.status, ack: s.ack });
    }
    return out;
  };

  /** Connect to `url` (ws:// or wss://); the client starts connecting at once. */
  function connect(url, options) {
    return new Client(url, options).connect();
  }

  return {
    connect: connect,
    Client: Client,
    SUBPROTOCOL: SUBPROTOCOL,
    VERSION: VERSION,
    DEFAULTS: DEFAULTS,
    backoffDelay: backoffDelay,
    isPattern: isPattern,
    matches: matches,
    WsbroadcastError: WsbroadcastError
  };
});
