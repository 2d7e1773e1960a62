"""A Flowmesh integrator over NATS, in Python (nats-py): the four things an integrator does.

1. publish an ``order.placed`` event on fm.events: it starts the flows with an ``event`` trigger
   for that type (``examples/integrators/orders-flow.json``);
2. follow the run it started on fm.runs, event by event;
3. consume the ``order.confirmed`` message the flow's ``publish`` step sends on fm.out;
4. publish the ``order.paid`` event the flow's ``waitEvent`` step waits for: the run resumes and ends.

Configuration, from the environment:
    NATS_URL          the NATS server (default nats://127.0.0.1:4222)
    FLOWMESH_TENANT   your tenant id (the ``tenant`` claim of your tokens; default dev)
    NATS_USER         your NATS user, ``integrator-<tenant token>`` (unset: no credentials, as in ``make run``)
    NATS_PASSWORD     its password
    ORDER_ID          the order to place (default: a new one)
    TIMEOUT_S         how long to wait for each step (default 30)

Run it: ``python orders.py``. It prints one line per thing it sees and exits 0 once the run has
succeeded (1 if it failed, 2 on a timeout).
"""

import asyncio
import hashlib
import json
import os
import re
import secrets
import sys
import uuid

import nats

SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
FINAL = {"run.succeeded", "run.failed", "run.cancelled", "run.timedOut"}


def tenant_token(tenant_id: str) -> str:
    """The tenant as one subject token: the id itself when it is safe, else ``_h`` + a hash of it."""
    if SAFE_TOKEN.fullmatch(tenant_id) and not tenant_id.startswith("_h"):
        return tenant_id
    return "_h" + hashlib.sha256(tenant_id.encode()).hexdigest()[:32]


def traceparent() -> str:
    """A new W3C trace context, so the run's records join your trace."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


async def publish_event(js, tenant: str, event_type: str, event: dict, msg_id: str) -> None:
    """Publish one event with JetStream; ``Nats-Msg-Id`` makes a retry of the same event a no-op."""
    subject = f"fm.events.{tenant_token(tenant)}.{event_type}"
    headers = {
        "Nats-Msg-Id": msg_id,
        "Flowmesh-Tenant": tenant,
        "Flowmesh-Schema": "1",
        "traceparent": traceparent(),
    }
    ack = await js.publish(subject, json.dumps(event).encode(), headers=headers)
    duplicate = "true" if ack.duplicate else "false"
    print(f"published {subject} msgId={msg_id} stream={ack.stream} seq={ack.seq} duplicate={duplicate}")


async def main() -> int:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    tenant = os.environ.get("FLOWMESH_TENANT", "dev")
    user = os.environ.get("NATS_USER")
    order_id = os.environ.get("ORDER_ID") or f"order-{uuid.uuid4().hex[:8]}"
    timeout = float(os.environ.get("TIMEOUT_S", "30"))
    t = tenant_token(tenant)

    login = {}
    if user:  # an integrator's replies (JetStream acknowledgements) must come to its own inboxes
        login = {"user": user, "password": os.environ["NATS_PASSWORD"], "inbox_prefix": f"_INBOX.{user}"}
    nc = await nats.connect(url, allow_reconnect=True, **login)
    js = nc.jetstream()

    # subscribe first: fm.runs and fm.out are read live, and what happens before a subscription is not seen
    runs: dict[str, list[dict]] = {}
    milestones: dict[tuple[str, str], asyncio.Future] = {}

    def milestone(run_id: str, name: str) -> asyncio.Future:
        """Resolved when run ``run_id`` reaches ``name``: an event such as ``step.waiting paid``, or ``final``."""
        return milestones.setdefault((run_id, name), asyncio.get_running_loop().create_future())

    async def on_run_event(msg) -> None:
        event = json.loads(msg.data)
        runs.setdefault(event["runId"], []).append(event)
        name = event["type"] + (f" {event['stepId']}" if event.get("stepId") else "")
        print(f"run {event['runId']} seq={event['seq']} {name}")
        for reached in (name, "final" if event["type"] in FINAL else None):
            if reached and not milestone(event["runId"], reached).done():
                milestone(event["runId"], reached).set_result(event["type"])

    await nc.subscribe(f"fm.runs.{t}.>", cb=on_run_event)
    confirmations = await nc.subscribe(f"fm.out.{t}.order.confirmed")
    await nc.flush()

    try:
        # (1) an event starts the flow; the same Nats-Msg-Id again is recognised as a duplicate
        placed = {"orderId": order_id, "total": 42}
        await publish_event(js, tenant, "order.placed", placed, msg_id=f"order.placed:{order_id}")
        await publish_event(js, tenant, "order.placed", placed, msg_id=f"order.placed:{order_id}")

        # (3) the flow's publish step confirms the order on fm.out (other orders' confirmations are skipped)
        while True:
            msg = await confirmations.next_msg(timeout=timeout)
            confirmed = json.loads(msg.data)
            if confirmed.get("orderId") == order_id:
                break
        run_id = confirmed["runId"]
        print(f"out {msg.subject} {json.dumps(confirmed, sort_keys=True, separators=(',', ':'))}")

        # (4) an event resumes only a step already waiting (it is not kept for one that waits later):
        # (2) the run's events say when its step "paid" waits; then this event resumes it
        await asyncio.wait_for(milestone(run_id, "step.waiting paid"), timeout)
        paid = {"orderId": order_id, "method": "card"}
        await publish_event(js, tenant, "order.paid", paid, msg_id=f"order.paid:{order_id}")

        # (2) the run's events, followed until it ends
        status = await asyncio.wait_for(milestone(run_id, "final"), timeout)
    except (TimeoutError, nats.errors.TimeoutError):
        print(f"timed out after {timeout:g} s waiting for order {order_id}", file=sys.stderr)
        return 2
    finally:
        await nc.drain()

    seqs = [e["seq"] for e in runs[run_id]]
    gap_free = sorted(seqs) == list(range(1, len(seqs) + 1))
    print(f"followed run {run_id}: {len(seqs)} events, gap-free={str(gap_free).lower()}, {status}")
    return 0 if status == "run.succeeded" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
