// An aqe agent in JavaScript on Node (18+), through `aqe agent` (BRIDGE.md). No
// dependencies.
//
//   const agent = await Agent.spawn("js", ["--bootstrap", "10.0.0.1:9000"]); // runs `aqe agent js ...`
//   const agent = await Agent.stdio(); // this program runs under `aqe agent js ... -- node me.mjs`
//
// Then register handlers (onRequest, onMessage, onStream, onEvent) and call request, send,
// broadcast, openStream, discover, stats. In stdio mode the bridge owns stdout: log to
// stderr.

import { spawn as spawnProcess } from "node:child_process";
import { createInterface } from "node:readline";

export class BridgeError extends Error {
  constructor(code, message, reason) {
    super(`${code}: ${message}`);
    this.code = code;
    this.reason = reason;
  }
}

/** Bytes (or text) sent as they are, not as JSON. */
export class Raw {
  constructor(data) {
    this.data = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
  }
  toString() {
    return this.data.toString("utf8");
  }
}

function putPayload(cmd, value) {
  if (value instanceof Raw) {
    const text = value.data.toString("utf8");
    if (Buffer.from(text, "utf8").equals(value.data)) cmd.text = text;
    else cmd.base64 = value.data.toString("base64");
  } else {
    cmd.payload = value === undefined ? null : value;
  }
  return cmd;
}

function payloadOf(event) {
  if ("payload" in event) return event.payload;
  if ("text" in event) return new Raw(event.text);
  if ("base64" in event) return new Raw(Buffer.from(event.base64, "base64"));
  return null;
}

function inbound(event) {
  return {
    id: event.id,
    from: event.from,
    channel: event.channel,
    trace: event.trace ?? null,
    redelivered: event.redelivered ?? false,
    payload: payloadOf(event),
  };
}

function options(cmd, fields) {
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) cmd[k] = v;
  return cmd;
}

export class Agent {
  #output;
  #nextRef = 1;
  #waiting = new Map();
  #peerWaiters = [];
  #ordered = Promise.resolve();
  #process;
  #ended;
  onRequestHandler = null;
  onMessageHandler = null;
  onStreamHandler = null;
  onEventHandler = null;
  peers = new Map();

  constructor(input, output, process) {
    this.#output = output;
    this.#process = process;
    let readyResolve, readyReject;
    this.readyPromise = new Promise((res, rej) => {
      readyResolve = res;
      readyReject = rej;
    });
    let endResolve;
    this.#ended = new Promise((res) => (endResolve = res));
    const lines = createInterface({ input, crlfDelay: Infinity });
    lines.on("line", (line) => {
      if (!line.trim()) return;
      const event = JSON.parse(line);
      if (!this.ready) {
        if (event.type === "ready") {
          this.ready = event;
          this.id = event.agent;
          this.at = event.at;
          readyResolve(this);
        } else readyReject(new BridgeError("failed", `the bridge did not start: ${line}`));
        return;
      }
      this.#dispatch(event);
    });
    lines.on("close", () => {
      readyReject(new BridgeError("failed", "the bridge ended before it was ready"));
      for (const { reject } of this.#waiting.values()) reject(new BridgeError("shutdown", "the bridge ended"));
      this.#waiting.clear();
      endResolve();
    });
  }

  /** Runs `aqe agent NAME ...joinArgs` and speaks for it (`aqe` from $AQE or PATH). */
  static spawn(name, joinArgs = [], { aqe = process.env.AQE || "aqe" } = {}) {
    const child = spawnProcess(aqe, ["agent", name, ...joinArgs], { stdio: ["pipe", "pipe", "inherit"] });
    return new Agent(child.stdout, child.stdin, child).readyPromise;
  }

  /** Speaks for the agent of the `aqe agent ... -- node me.mjs` that started this program. */
  static stdio() {
    return new Agent(process.stdin, process.stdout, null).readyPromise;
  }

  // ----- handlers -----

  /** `fn(inbound)` (may be async) returns the answer: a JSON value or a `Raw`; throwing answers with an error. */
  onRequest(fn) {
    this.onRequestHandler = fn;
    return this;
  }
  /** `fn(inbound)` for each message, in order. */
  onMessage(fn) {
    this.onMessageHandler = fn;
    return this;
  }
  /** `fn(number, event)` for each streamOpened, chunk and streamClosed event, in order. */
  onStream(fn) {
    this.onStreamHandler = fn;
    return this;
  }
  /** `fn(event)` for every other event (peerJoined, deliveryFailed, ...). */
  onEvent(fn) {
    this.onEventHandler = fn;
    return this;
  }

  // ----- commands -----

  async send(to, payload, { channel, confirm = false, ttlMs, trace } = {}) {
    const cmd = putPayload({ op: "send", to, confirm }, payload);
    return (await this.#call(options(cmd, { channel, ttlMs, trace }))).id;
  }

  async request(to, payload, { timeoutMs = 30000, retries = 0, channel, trace } = {}) {
    const cmd = putPayload({ op: "request", to, timeoutMs, retries }, payload);
    return inbound(await this.#call(options(cmd, { channel, trace })));
  }

  broadcast(payload, { channel, confirm = false, trace } = {}) {
    return this.#call(options(putPayload({ op: "broadcast", confirm }, payload), { channel, trace }));
  }

  async openStream(to, { channel } = {}) {
    const { stream } = await this.#call(options({ op: "streamOpen", to }, { channel }));
    return {
      number: stream,
      write: (data, fin = false) =>
        this.#call(putPayload({ op: "streamWrite", stream, fin, ack: true }, new Raw(data))),
      close: () => this.#call({ op: "streamWrite", stream, fin: true, ack: true }),
    };
  }

  async discover({ agentType, capability, channel, limit } = {}) {
    return (await this.#call(options({ op: "discover" }, { agentType, capability, channel, limit }))).peers;
  }

  stats() {
    return this.#call({ op: "stats" });
  }

  /** Resolves once `agentId` is known (it may be already). */
  async waitForPeer(agentId, timeoutMs = 30000) {
    if (this.peers.has(agentId)) return;
    const known = new Promise((resolve) => this.#peerWaiters.push({ agentId, resolve }));
    if ((await this.discover()).some((p) => p.id === agentId)) return;
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new BridgeError("timeout", `${agentId} did not join`)), timeoutMs);
    });
    try {
      await Promise.race([known, late]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Resolves when the bridge ends. */
  closed() {
    return this.#ended;
  }

  /** Leaves the fleet; the bridge exits. */
  async leave() {
    this.#write({ op: "leave" });
    if (this.#process) this.#process.stdin.end();
    await this.#ended;
  }

  // ----- the line protocol -----

  #write(cmd) {
    this.#output.write(JSON.stringify(cmd) + "\n");
  }

  #call(cmd) {
    const ref = this.#nextRef++;
    cmd.ref = ref;
    return new Promise((resolve, reject) => {
      this.#waiting.set(ref, { resolve, reject });
      this.#write(cmd);
    });
  }

  /** Handlers of messages, streams and events run one after another, in arrival order. */
  #inOrder(fn, ...args) {
    this.#ordered = this.#ordered
      .then(() => fn(...args))
      .catch((e) => console.error(`aqe-bridge: handler failed: ${e}`));
  }

  #dispatch(event) {
    const kind = event.type;
    if ((kind === "ok" || kind === "error" || kind === "response") && this.#waiting.has(event.ref)) {
      const { resolve, reject } = this.#waiting.get(event.ref);
      this.#waiting.delete(event.ref);
      if (kind === "error") reject(new BridgeError(event.code, event.message, event.reason));
      else resolve(event);
    } else if (kind === "request") {
      this.#answer(event);
    } else if (kind === "message") {
      if (this.onMessageHandler) this.#inOrder(this.onMessageHandler, inbound(event));
    } else if (kind === "streamOpened" || kind === "chunk" || kind === "streamClosed") {
      if (this.onStreamHandler) this.#inOrder(this.onStreamHandler, event.stream, event);
    } else {
      if (kind === "peerJoined") {
        this.peers.set(event.peer.id, event.peer);
        for (const w of this.#peerWaiters.filter((w) => w.agentId === event.peer.id)) w.resolve();
        this.#peerWaiters = this.#peerWaiters.filter((w) => w.agentId !== event.peer.id);
      } else if (kind === "peerLeft") {
        this.peers.delete(event.agent);
      }
      if (this.onEventHandler) this.#inOrder(this.onEventHandler, event);
    }
  }

  async #answer(event) {
    const reply = { op: "reply", id: event.id };
    if (!this.onRequestHandler) reply.error = "this agent answers no requests";
    else {
      try {
        putPayload(reply, await this.onRequestHandler(inbound(event)));
      } catch (e) {
        reply.error = String(e?.message ?? e);
      }
    }
    this.#write(reply);
  }
}
