// A JavaScript agent: answers requests, and asks another agent once (`--ask AGENT`).
// It runs `aqe agent` itself, joining as the environment says (AQE_BOOTSTRAP, AQE_CERTS,
// AQE_NAME, AQE_TOKEN, ...; AQE is the command's path):
//
//   AQE_BOOTSTRAP=127.0.0.1:9000 node clients/node/example.mjs js --ask py

import { Agent } from "./aqe-bridge.mjs";

const name = process.argv[2] ?? "js";
const at = process.argv.indexOf("--ask");
const ask = at > 0 ? process.argv[at + 1] : null;

const agent = await Agent.spawn(name, ["--listen", "127.0.0.1:0"]);
console.log(`${agent.id}: ready at ${agent.at}`);

agent.onRequest((req) => ({ agent: agent.id, language: "javascript", got: req.payload, trace: req.trace }));

if (ask) {
  await agent.waitForPeer(ask);
  const reply = await agent.request(ask, { from: agent.id });
  console.log(`${agent.id} asked ${ask}: ${JSON.stringify(reply.payload)}`);
}

// Until stdin closes (or Ctrl-C): then leave the fleet cleanly.
process.stdin.resume();
process.stdin.on("end", () => agent.leave().then(() => process.exit(0)));
process.on("SIGTERM", () => agent.leave().then(() => process.exit(0)));
await agent.closed();
