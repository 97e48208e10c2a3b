// Test peer: npm fluent-logger 3.x (createFluentSender) as an upstream sender.
// Usage: node fluent_logger_client.mjs PORT MODE COUNT [--ack] [--shared-key K]
//                                      [--hostname H] [--user NAME:PASS] [--tag TAG]
// MODE is Message | PackedForward | CompressedPackedForward. Emits COUNT records
// {"seq": i, "msg": ...}; waits for every callback (after the ack with --ack), ends the
// sender, prints "SENT <count>" and exits 0; exits 1 on any error.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const logger = require("fluent-logger");

const args = process.argv.slice(2);
const port = Number(args.shift());
const mode = args.shift();
const count = Number(args.shift());
const options = {
  host: "127.0.0.1",
  port,
  timeout: 5.0,
  eventMode: mode,
  flushInterval: 20,
  internalLogger: { info() {}, error: (m) => console.error(m) },
};
let tag = "npm.fluentlogger";
while (args.length) {
  const key = args.shift();
  if (key === "--ack") {
    options.requireAckResponse = true;
    options.ackResponseTimeout = 10000;
  } else if (key === "--shared-key") {
    options.security = {
      clientHostname: "npm-fluent-logger",
      username: "",
      password: "",
      ...options.security,
    };
    options.security.sharedKey = args.shift();
  } else if (key === "--hostname") {
    options.security = { ...options.security, clientHostname: args.shift() };
  } else if (key === "--user") {
    const v = args.shift();
    const i = v.indexOf(":");
    options.security = { ...options.security, username: v.slice(0, i), password: v.slice(i + 1) };
  } else if (key === "--tag") tag = args.shift();
  else throw new Error(`unknown option ${key}`);
}

const timer = setTimeout(() => {
  console.error("timeout");
  process.exit(1);
}, 20000);
const sender = logger.createFluentSender(tag, options);
sender.on("error", (err) => {
  console.error(`ERROR ${err && err.name}: ${err && err.message}`);
  process.exit(1);
});
let done = 0;
for (let i = 0; i < count; i++) {
  sender.emit("rec", { seq: i, msg: `hello ${i}` }, (err) => {
    if (err) {
      console.error(`ERROR ${err.name}: ${err.message}`);
      process.exit(1);
    }
    done += 1;
    if (done === count) {
      sender.end();
      process.stdout.write(`SENT ${count}\n`);
      clearTimeout(timer);
      setTimeout(() => process.exit(0), 50);
    }
  });
}
