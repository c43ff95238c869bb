// Starts kinesis-mock (npm kinesis-local), the emulator most faithful to AWS
// for resharding, ChildShards and MillisBehindLatest, for the compatibility
// run of the suite. It has no host setting and listens on every interface,
// so every server it opens is pinned to 127.0.0.1 before it loads.
const net = require("net");
const path = require("path");

const [plainPort, tlsPort] = process.argv.slice(2).map(Number);
if (!plainPort || !tlsPort) {
  console.error("usage: node kinesis-mock.js PLAIN_PORT TLS_PORT");
  process.exit(2);
}

let listening = 0;
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const callback = args.find((arg) => typeof arg === "function");
  const options = typeof args[0] === "object" && args[0] !== null ? args[0] : { port: args[0] };
  // A port in use must stop the run, not leave a half-started emulator.
  this.once("error", (error) => {
    console.error(`kinesis-mock: ${error.message}`);
    process.exit(1);
  });
  // Ready once both its servers listen: the run starts on that line.
  this.once("listening", () => {
    listening += 1;
    if (listening === 2) console.log(`kinesis-mock listening on http://127.0.0.1:${plainPort}`);
  });
  return listen.call(this, { ...options, host: "127.0.0.1" }, callback);
};

Object.assign(process.env, {
  KINESIS_MOCK_PLAIN_PORT: String(plainPort),
  KINESIS_MOCK_TLS_PORT: String(tlsPort),
  // Streams come and go as fast as the tests make them; one stream per test
  // needs more than the default 50 shards in all.
  CREATE_STREAM_DURATION: "0ms",
  DELETE_STREAM_DURATION: "0ms",
  UPDATE_STREAM_DURATION: "0ms",
  SHARD_LIMIT: "100000",
  LOG_LEVEL: process.env.LOG_LEVEL || "WARN",
});

// server.json (its TLS certificate) is looked up next to the working directory.
// Its own shutdown hook can take long while it is busy; the tests are done
// with it by then.
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));

const main = require.resolve("kinesis-local/main.js");
process.chdir(path.dirname(main));
require(main);
