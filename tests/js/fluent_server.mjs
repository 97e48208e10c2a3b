// Test peer: @fluent-org/logger's FluentServer as a downstream sink.
// Usage: node fluent_server.mjs PORT [--shared-key K] [--hostname H] [--user NAME:PASS]...
//                                    [--tls-cert FILE --tls-key FILE]
// Prints "LISTENING <port>" once ready, then one JSON line per record:
// {"tag": ..., "time": <number> | [seconds, nanoseconds], "record": {...}}. Stops on SIGTERM
// or when stdin closes.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const { FluentServer, EventTime } = require("@fluent-org/logger");

const args = process.argv.slice(2);
const port = Number(args.shift() ?? 0);
const opts = { users: {} };
while (args.length) {
  const key = args.shift();
  const value = args.shift();
  if (key === "--shared-key") opts.sharedKey = value;
  else if (key === "--hostname") opts.hostname = value;
  else if (key === "--user") {
    const i = value.indexOf(":");
    opts.users[value.slice(0, i)] = value.slice(i + 1);
  } else if (key === "--tls-cert") opts.cert = value;
  else if (key === "--tls-key") opts.key = value;
  else throw new Error(`unknown option ${key}`);
}

const options = { listenOptions: { host: "127.0.0.1", port } };
if (opts.sharedKey !== undefined) {
  options.security = {
    serverHostname: opts.hostname ?? "fluent-server",
    sharedKey: opts.sharedKey,
    authorize: Object.keys(opts.users).length > 0,
    userDict: opts.users,
  };
}
if (opts.cert) {
  options.tlsOptions = { cert: readFileSync(opts.cert), key: readFileSync(opts.key) };
}

const server = new FluentServer(options);
server.on("entry", (tag, time, record) => {
  const t = time instanceof EventTime ? [time.epoch, time.nano] : time;
  const safe = JSON.stringify({ tag, time: t, record }, (_k, v) =>
    v instanceof Uint8Array ? Buffer.from(v).toString("base64") : v,
  );
  process.stdout.write(safe + "\n");
});
await server.listen();
process.stdout.write(`LISTENING ${server.port}\n`);

const stop = () => process.exit(0);
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();
