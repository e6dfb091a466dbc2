// Node.js clients against kvstore: ioredis's and node-redis's (v4) `multi().exec()`,
// which before transactions existed applied the writes and then failed on EXEC.
//
// Run with `bash tests/node/run.sh` (installs the clients into target/nodeenv). The test
// starts its own kvstore process (KVSTORE_BIN) on a free port with a temp data dir,
// waits for it with a deadline, and kills it and removes the directory at the end.
"use strict";

const { test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const Redis = require("ioredis");
const { createClient } = require("redis");

const START_DEADLINE_MS = 10000;

let server;
let port;
let dataDir;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

function pingOnce(p) {
  return new Promise((resolve) => {
    const sock = net.connect(p, "127.0.0.1");
    sock.setTimeout(1000);
    sock.on("connect", () => sock.write("PING\r\n"));
    sock.on("data", (d) => {
      sock.destroy();
      resolve(d.toString().startsWith("+PONG"));
    });
    sock.on("error", () => resolve(false));
    sock.on("timeout", () => {
      sock.destroy();
      resolve(false);
    });
  });
}

before(async () => {
  const bin = process.env.KVSTORE_BIN;
  assert.ok(bin, "KVSTORE_BIN must name the kvstore binary (tests/node/run.sh sets it)");
  port = await freePort();
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "kvstore-node-"));
  server = spawn(bin, ["server", String(port), "--data-dir", path.join(dataDir, "data")], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const end = Date.now() + START_DEADLINE_MS;
  while (!(await pingOnce(port))) {
    if (Date.now() > end || server.exitCode !== null) {
      throw new Error(`kvstore did not answer PING on port ${port} within ${START_DEADLINE_MS} ms`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
});

after(() => {
  if (server) server.kill("SIGKILL");
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
});

test("ioredis multi().exec() applies all and answers each command", async () => {
  const r = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0 });
  await r.connect();
  try {
    const res = await r.multi().set("io:k", "v").get("io:k").incr("io:n").exec();
    assert.deepEqual(res, [
      [null, "OK"],
      [null, "v"],
      [null, 1],
    ]);
    // A queueing error: EXECABORT, nothing applied.
    await assert.rejects(
      r.multi().set("io:never", "1").call("GET").exec(),
      /EXECABORT Transaction discarded because of previous errors/,
    );
    assert.equal(await r.exists("io:never"), 0);
    // WATCH: a changed key makes exec() resolve to null.
    const other = new Redis({ port, host: "127.0.0.1" });
    await r.watch("io:w");
    await other.set("io:w", "changed");
    assert.equal(await r.multi().set("io:w", "mine").exec(), null);
    assert.equal(await r.get("io:w"), "changed");
    other.disconnect();
  } finally {
    r.disconnect();
  }
});

test("node-redis v4 multi().exec() applies all and answers each command", async () => {
  const c = createClient({ socket: { port, host: "127.0.0.1" } });
  await c.connect();
  try {
    const res = await c.multi().set("nr:k", "v").get("nr:k").incr("nr:n").exec();
    assert.deepEqual(res, ["OK", "v", 1]);
    // executeIsolated + WATCH: a changed key fails the transaction.
    await assert.rejects(
      c.executeIsolated(async (iso) => {
        await iso.watch("nr:w");
        await c.set("nr:w", "changed");
        return iso.multi().set("nr:w", "mine").exec();
      }),
      /watched keys has been changed/,
    );
    assert.equal(await c.get("nr:w"), "changed");
  } finally {
    await c.quit();
  }
});
