// A Flowmesh integrator over NATS, in JavaScript (the official client: @nats-io/transport-node and
// @nats-io/jetstream): the four things an integrator does.
//
// 1. publish an `order.placed` event on fm.events: it starts the flows with an `event` trigger for
//    that type (examples/integrators/orders-flow.json);
// 2. follow the run it started on fm.runs, event by event;
// 3. consume the `order.confirmed` message the flow's `publish` step sends on fm.out;
// 4. publish the `order.paid` event the flow's `waitEvent` step waits for: the run resumes and ends.
//
// Configuration, from the environment:
//   NATS_URL          the NATS server (default nats://127.0.0.1:4222)
//   FLOWMESH_TENANT   your tenant id (the `tenant` claim of your tokens; default dev)
//   NATS_USER         your NATS user, `integrator-<tenant token>` (unset: no credentials, as in `make run`)
//   NATS_PASSWORD     its password
//   ORDER_ID          the order to place (default: a new one)
//   TIMEOUT_S         how long to wait for each step (default 30)
//
// Run it: `node orders.mjs`. It prints one line per thing it sees and exits 0 once the run has
// succeeded (1 if it failed, 2 on a timeout).

import { createHash, randomBytes, randomUUID } from "node:crypto";
import { jetstream } from "@nats-io/jetstream";
import { connect, headers } from "@nats-io/transport-node";

const SAFE_TOKEN = /^[A-Za-z0-9_-]{1,64}$/;
const FINAL = new Set(["run.succeeded", "run.failed", "run.cancelled", "run.timedOut"]);

/** The tenant as one subject token: the id itself when it is safe, else `_h` + a hash of it. */
export function tenantToken(tenantId) {
  if (SAFE_TOKEN.test(tenantId) && !tenantId.startsWith("_h")) {
    return tenantId;
  }
  return "_h" + createHash("sha256").update(tenantId, "utf8").digest("hex").slice(0, 32);
}

/** A new W3C trace context, so the run's records join your trace. */
function traceparent() {
  return `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;
}

/** Publish one event with JetStream; `msgID` (the Nats-Msg-Id header) makes a retry of the same event a no-op. */
async function publishEvent(js, tenant, eventType, event, msgID) {
  const subject = `fm.events.${tenantToken(tenant)}.${eventType}`;
  const h = headers();
  h.set("Flowmesh-Tenant", tenant);
  h.set("Flowmesh-Schema", "1");
  h.set("traceparent", traceparent());
  const ack = await js.publish(subject, JSON.stringify(event), { msgID, headers: h });
  console.log(`published ${subject} msgId=${msgID} stream=${ack.stream} seq=${ack.seq} duplicate=${Boolean(ack.duplicate)}`);
}

/** `promise`, or a rejection after `seconds`. */
function within(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${seconds} s waiting for ${what}`)), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const url = process.env.NATS_URL || "nats://127.0.0.1:4222";
  const tenant = process.env.FLOWMESH_TENANT || "dev";
  const user = process.env.NATS_USER;
  const orderId = process.env.ORDER_ID || `order-${randomUUID().slice(0, 8)}`;
  const timeout = Number(process.env.TIMEOUT_S || "30");
  const t = tenantToken(tenant);

  // an integrator's replies (JetStream acknowledgements) must come to its own inboxes
  const login = user ? { user, pass: process.env.NATS_PASSWORD, inboxPrefix: `_INBOX.${user}` } : {};
  const nc = await connect({ servers: url, ...login });
  const js = jetstream(nc);

  // subscribe first: fm.runs and fm.out are read live, and what happens before a subscription is not seen
  const runs = new Map(); // runId -> its events
  const milestones = new Map(); // "runId name" -> {promise, resolve}
  // resolved when run `runId` reaches `name`: an event such as `step.waiting paid`, or `final`
  const milestone = (runId, name) => {
    const key = `${runId} ${name}`;
    if (!milestones.has(key)) {
      let resolve;
      const promise = new Promise((r) => (resolve = r));
      milestones.set(key, { promise, resolve });
    }
    return milestones.get(key);
  };
  nc.subscribe(`fm.runs.${t}.>`, {
    callback: (err, msg) => {
      if (err) return;
      const event = msg.json();
      if (!runs.has(event.runId)) runs.set(event.runId, []);
      runs.get(event.runId).push(event);
      const name = event.type + (event.stepId ? ` ${event.stepId}` : "");
      console.log(`run ${event.runId} seq=${event.seq} ${name}`);
      milestone(event.runId, name).resolve(event.type);
      if (FINAL.has(event.type)) milestone(event.runId, "final").resolve(event.type);
    },
  });
  let confirmedOrder;
  const confirmation = new Promise((resolve) => (confirmedOrder = resolve));
  nc.subscribe(`fm.out.${t}.order.confirmed`, {
    callback: (err, msg) => {
      if (err) return;
      const confirmed = msg.json();
      if (confirmed.orderId === orderId) confirmedOrder({ subject: msg.subject, confirmed }); // others: not ours
    },
  });
  await nc.flush();

  let status;
  let runId;
  try {
    // (1) an event starts the flow; the same Nats-Msg-Id again is recognised as a duplicate
    const placed = { orderId, total: 42 };
    await publishEvent(js, tenant, "order.placed", placed, `order.placed:${orderId}`);
    await publishEvent(js, tenant, "order.placed", placed, `order.placed:${orderId}`);

    // (3) the flow's publish step confirms the order on fm.out
    const { subject, confirmed } = await within(confirmation, timeout, `the confirmation of ${orderId}`);
    runId = confirmed.runId;
    const sorted = Object.fromEntries(Object.entries(confirmed).sort(([a], [b]) => (a < b ? -1 : 1)));
    console.log(`out ${subject} ${JSON.stringify(sorted)}`);

    // (4) an event resumes only a step already waiting (it is not kept for one that waits later):
    // (2) the run's events say when its step "paid" waits; then this event resumes it
    await within(milestone(runId, "step.waiting paid").promise, timeout, `run ${runId} to wait for payment`);
    await publishEvent(js, tenant, "order.paid", { orderId, method: "card" }, `order.paid:${orderId}`);

    // (2) the run's events, followed until it ends
    status = await within(milestone(runId, "final").promise, timeout, `the end of run ${runId}`);
  } catch (err) {
    console.error(err.message);
    await nc.drain();
    return 2;
  }
  await nc.drain();

  const seqs = runs.get(runId).map((e) => e.seq);
  const gapFree = [...seqs].sort((a, b) => a - b).every((s, i) => s === i + 1);
  console.log(`followed run ${runId}: ${seqs.length} events, gap-free=${gapFree}, ${status}`);
  return status === "run.succeeded" ? 0 : 1;
}

process.exitCode = await main();
