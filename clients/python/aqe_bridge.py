"""An aqe agent in Python, through `aqe agent` (BRIDGE.md). Standard library only.

Two ways in:

    agent = await Agent.spawn("py", "--bootstrap", "10.0.0.1:9000")  # runs `aqe agent py ...`
    agent = await Agent.stdio()  # this program runs under `aqe agent py ... -- python3 me.py`

Then register handlers, call `await agent.request(...)`, `send`, `broadcast`, streams, and
keep `await agent.run()` (or `agent.serve()`, a task) going to receive. In `stdio` mode the
bridge owns stdout: print to stderr.
"""

import asyncio
import base64
import itertools
import json
import os
import sys

__all__ = ["Agent", "BridgeError", "Raw", "Inbound", "Stream"]

MAX_LINE = 16 << 20


class BridgeError(Exception):
    """A command failed: `code` as BRIDGE.md lists them, `reason` for delivery failures."""

    def __init__(self, code, message, reason=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


class Raw:
    """Bytes sent as they are (`text` or `base64` on the bridge), not as JSON."""

    def __init__(self, data):
        self.data = data.encode() if isinstance(data, str) else bytes(data)


def _put_payload(cmd, value):
    if isinstance(value, Raw):
        try:
            cmd["text"] = value.data.decode()
        except UnicodeDecodeError:
            cmd["base64"] = base64.b64encode(value.data).decode()
    else:
        cmd["payload"] = value
    return cmd


def _payload_of(event):
    if "payload" in event:
        return event["payload"]
    if "text" in event:
        return Raw(event["text"])
    if "base64" in event:
        return Raw(base64.b64decode(event["base64"]))
    return None


class Inbound:
    """A message or request that reached the agent (or a response)."""

    def __init__(self, event):
        self.id = event.get("id")
        self.sender = event.get("from")
        self.channel = event.get("channel")
        self.trace = event.get("trace")
        self.redelivered = event.get("redelivered", False)
        self.payload = _payload_of(event)

    def __repr__(self):
        return f"Inbound(from={self.sender!r}, payload={self.payload!r})"


class Stream:
    """A stream this agent opened: `await write(data)`, `await close()`."""

    def __init__(self, agent, number):
        self._agent = agent
        self.number = number

    async def write(self, data, fin=False):
        cmd = _put_payload({"op": "streamWrite", "stream": self.number, "fin": fin, "ack": True}, Raw(data))
        await self._agent._call(cmd)

    async def close(self):
        await self._agent._call({"op": "streamWrite", "stream": self.number, "fin": True, "ack": True})


class Agent:
    def __init__(self, reader, writer, process=None):
        self._reader = reader
        self._writer = writer
        self._process = process
        self._refs = itertools.count(1)
        self._waiting = {}
        self._streams = {}
        self._on_request = None
        self._on_message = None
        self._on_stream = None
        self._on_event = None
        self._peer_waiters = []
        self._tasks = set()
        self.ready = None
        self.peers = {}

    # ----- joining -----

    @classmethod
    async def spawn(cls, name, *join_args, aqe=None):
        """Runs `aqe agent NAME JOIN_ARGS` and speaks for it (`aqe` from $AQE or PATH)."""
        exe = aqe or os.environ.get("AQE", "aqe")
        proc = await asyncio.create_subprocess_exec(
            exe, "agent", name, *join_args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE,
        )
        agent = cls(proc.stdout, proc.stdin, proc)
        await agent._started()
        return agent

    @classmethod
    async def stdio(cls):
        """Speaks for the agent of the `aqe agent ... -- CMD` that started this program."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        agent = cls(reader, writer)
        await agent._started()
        return agent

    async def _started(self):
        event = await self._next()
        if event is None or event.get("type") != "ready":
            raise BridgeError("failed", f"the bridge did not start: {event!r}")
        self.ready = event
        self.id = event["agent"]
        self.at = event["at"]
        # Handlers of messages, streams and events run in order, apart from the reader, so
        # that one awaiting a request's answer does not stop the answer being read.
        self._ordered = asyncio.Queue(1024)
        self._handlers = asyncio.ensure_future(self._handle_ordered())
        self._runner = asyncio.ensure_future(self.run())

    # ----- handlers -----

    def on_request(self, fn):
        """`fn(inbound)` (sync or async) returns the answer: a JSON value or `Raw`; raising
        answers with an error. Usable as a decorator."""
        self._on_request = fn
        return fn

    def on_message(self, fn):
        """`fn(inbound)` for each message, in order."""
        self._on_message = fn
        return fn

    def on_stream(self, fn):
        """`fn(number, event)` for each `streamOpened`, `chunk` and `streamClosed` event."""
        self._on_stream = fn
        return fn

    def on_event(self, fn):
        """`fn(event)` for every other event (peerJoined, deliveryFailed, ...)."""
        self._on_event = fn
        return fn

    # ----- commands -----

    async def send(self, to, payload=None, *, channel=None, confirm=False, ttl_ms=None, trace=None):
        """Sends a message; returns its id (with `confirm`, once the receiver took it)."""
        cmd = _put_payload({"op": "send", "to": to, "confirm": confirm}, payload)
        _options(cmd, channel=channel, ttlMs=ttl_ms, trace=trace)
        return (await self._call(cmd))["id"]

    async def request(self, to, payload=None, *, timeout_ms=30000, retries=0, channel=None, trace=None):
        """Asks `to` and returns its answer (an `Inbound`: `.payload`, `.sender`)."""
        cmd = _put_payload({"op": "request", "to": to, "timeoutMs": timeout_ms, "retries": retries}, payload)
        _options(cmd, channel=channel, trace=trace)
        return Inbound(await self._call(cmd))

    async def broadcast(self, payload=None, *, channel=None, confirm=False, trace=None):
        """Sends to every agent on the channel; returns `{id, delivered, failed}`."""
        cmd = _put_payload({"op": "broadcast", "confirm": confirm}, payload)
        _options(cmd, channel=channel, trace=trace)
        return await self._call(cmd)

    async def open_stream(self, to, *, channel=None):
        event = await self._call(_options({"op": "streamOpen", "to": to}, channel=channel))
        return Stream(self, event["stream"])

    async def discover(self, *, agent_type=None, capability=None, channel=None, limit=None):
        cmd = _options({"op": "discover"}, agentType=agent_type, capability=capability, channel=channel, limit=limit)
        return (await self._call(cmd))["peers"]

    async def stats(self):
        return await self._call({"op": "stats"})

    async def wait_for_peer(self, agent_id, timeout=30):
        """Returns once `agent_id` is known (it may be already)."""
        if agent_id in self.peers:
            return
        # Waiting first: a peerJoined read while discover is answered is not missed.
        fut = asyncio.get_running_loop().create_future()
        self._peer_waiters.append((agent_id, fut))
        try:
            if any(p["id"] == agent_id for p in await self.discover()) or agent_id in self.peers:
                return
            await asyncio.wait_for(fut, timeout)
        finally:
            self._peer_waiters = [w for w in self._peer_waiters if w[1] is not fut]

    async def leave(self):
        """Leaves the fleet; the bridge exits."""
        await self._write({"op": "leave"})
        if self._process is not None:
            await self._process.wait()

    # ----- the line protocol -----

    async def _call(self, cmd):
        ref = next(self._refs)
        cmd["ref"] = ref
        fut = asyncio.get_running_loop().create_future()
        self._waiting[ref] = fut
        await self._write(cmd)
        return await fut

    async def _write(self, cmd):
        self._writer.write(json.dumps(cmd).encode() + b"\n")
        await self._writer.drain()

    async def _next(self):
        line = await self._reader.readline()
        if not line:
            return None
        return json.loads(line)

    async def run(self):
        """Reads events until the bridge ends (the agent runs this itself: see `serve`)."""
        while True:
            event = await self._next()
            if event is None:
                break
            kind = event.get("type")
            if kind in ("ok", "error", "response") and event.get("ref") in self._waiting:
                fut = self._waiting.pop(event["ref"])
                if kind == "error":
                    fut.set_exception(BridgeError(event["code"], event["message"], event.get("reason")))
                else:
                    fut.set_result(event)
            elif kind == "request":
                self._spawn(self._answer(event))
            elif kind == "message" and self._on_message:
                await self._ordered.put((self._on_message, (Inbound(event),)))
            elif kind in ("streamOpened", "chunk", "streamClosed") and self._on_stream:
                await self._ordered.put((self._on_stream, (event["stream"], event)))
            else:
                if kind == "peerJoined":
                    peer = event["peer"]
                    self.peers[peer["id"]] = peer
                    for agent_id, fut in list(self._peer_waiters):
                        if agent_id == peer["id"] and not fut.done():
                            fut.set_result(None)
                elif kind == "peerLeft":
                    self.peers.pop(event["agent"], None)
                if self._on_event:
                    await self._ordered.put((self._on_event, (event,)))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BridgeError("shutdown", "the bridge ended"))
        await self._ordered.put(None)

    async def _handle_ordered(self):
        while True:
            item = await self._ordered.get()
            if item is None:
                return
            fn, args = item
            try:
                await _call_maybe_async(fn, *args)
            except Exception as e:
                print(f"aqe_bridge: handler failed: {e!r}", file=sys.stderr)

    def serve(self):
        """The task reading events (started when the agent is): await it to run until the
        bridge ends."""
        return self._runner

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, event):
        reply = {"op": "reply", "id": event["id"]}
        if self._on_request is None:
            reply["error"] = "this agent answers no requests"
        else:
            try:
                _put_payload(reply, await _call_maybe_async(self._on_request, Inbound(event)))
            except Exception as e:  # the requester hears the error
                reply["error"] = str(e) or type(e).__name__
        await self._write(reply)


def _options(cmd, **fields):
    for k, v in fields.items():
        if v is not None:
            cmd[k] = v
    return cmd


async def _call_maybe_async(fn, *args):
    value = fn(*args)
    if asyncio.iscoroutine(value):
        value = await value
    return value
