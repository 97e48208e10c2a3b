// Test peer: @fluent-org/logger's FluentClient as an upstream sender.
// Usage: node fluent_org_client.mjs PORT MODE COUNT [--ack] [--shared-key K] [--hostname H]
//                                   [--user NAME:PASS] [--tag TAG] [--deadline MS]
// MODE is Message | Forward | PackedForward | CompressedPackedForward. Emits COUNT records
// {"seq": i, "mode": MODE, "msg": ...} with an EventTime, waits for every emit promise (acked
// when --ack), disconnects, prints "SENT <count>" and exits 0; exits 1 on any error.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { FluentClient, EventTime } = require("@fluent-org/logger");

const args = process.argv.slice(2);
const port = Number(args.shift());
const mode = args.shift();
const count = Number(args.shift());
let ack = false;
let tag = "npm.fluentorg";
let security;
let user;
let deadline = 20000;
while (args.length) {
  const key = args.shift();
  if (key === "--ack") ack = true;
  else if (key === "--shared-key") security = { ...security, sharedKey: args.shift() };
  else if (key === "--hostname") security = { ...security, clientHostname: args.shift() };
  else if (key === "--user") user = args.shift();
  else if (key === "--tag") tag = args.shift();
  else if (key === "--deadline") deadline = Number(args.shift());
  else throw new Error(`unknown option ${key}`);
}
if (security) {
  security.clientHostname = security.clientHostname ?? "npm-fluent-org-client";
  if (user) {
    const i = user.indexOf(":");
    security.username = user.slice(0, i);
    security.password = user.slice(i + 1);
  }
}

const options = {
  socket: { host: "127.0.0.1", port, timeout: 5000, disableReconnect: true },
  eventMode: mode,
  flushInterval: 20,
};
if (ack) options.ack = { ackTimeout: 10000 };
if (security) options.security = security;

const timer = setTimeout(() => {
  console.error("ERROR timeout");
  process.exit(1);
}, deadline);
try {
  const logger = new FluentClient(tag, options);
  await logger.connect();
  const sends = [];
  for (let i = 0; i < count; i++) {
    const t = new EventTime(1700000000 + i, 123456789);
    sends.push(logger.emit("rec", { seq: i, mode, msg: `hello ${i}`, nested: { a: [1, 2] } }, t));
  }
  await Promise.all(sends);
  await logger.disconnect();
  process.stdout.write(`SENT ${count}\n`);
  clearTimeout(timer);
  process.exit(0);
} catch (err) {
  console.error(`ERROR ${err && err.name}: ${err && err.message}`);
  process.exit(1);
}
