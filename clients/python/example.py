"""A Python agent: answers requests, and asks another agent once (`--ask AGENT`).

Run under the bridge, which owns stdout (so this prints to stderr):

    aqe agent py --bootstrap 127.0.0.1:9000 -- python3 clients/python/example.py --ask js
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aqe_bridge import Agent  # noqa: E402

# A W3C traceparent: the request to --ask carries it, and the answer shows what arrived.
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def say(*words):
    print(*words, file=sys.stderr, flush=True)


async def main():
    ask = sys.argv[sys.argv.index("--ask") + 1] if "--ask" in sys.argv else None
    agent = await Agent.stdio()
    say(f"{agent.id}: ready at {agent.at}")

    @agent.on_request
    def answer(req):
        return {"agent": agent.id, "language": "python", "got": req.payload, "trace": req.trace}

    if ask:
        await agent.wait_for_peer(ask)
        reply = await agent.request(ask, {"from": agent.id}, trace=TRACE)
        say(f"{agent.id} asked {ask}: {json.dumps(reply.payload, sort_keys=True)}")
    await agent.serve()


asyncio.run(main())
