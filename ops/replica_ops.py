"""zimagectl on a stack of replicas: the rolling restart (one replica at a time: drained,
restarted, warmed, back in HAProxy's pool, then the next) and the per-replica status."""

from __future__ import annotations

import time
from typing import Callable, Optional

from common.polling import poll_until
from common.replicas import Replica
from monitor.status import read_state
from ops.balancer import all_in_pool, server_states
from ops.stack import Stack

IN_POOL_TIMEOUT_S = 30.0  # HAProxy's rise: two checks 0.5 s apart, with room for a slow check


def pick(stack: Stack, target: Optional[str]) -> list[Replica]:
    """`app:1`, `app-1` or `1` → that replica; None → all of them, in order."""
    if not target or target == "app":
        return stack.replicas
    index = target.replace("app:", "").replace("app-", "")
    if not index.isdigit() or int(index) >= len(stack.replicas):
        raise ValueError(f"no replica {target!r}: this stack runs app:0 … app:{len(stack.replicas) - 1}")
    return [stack.replicas[int(index)]]


def actions_for(stack: Stack, replica: Replica, **cfg_overrides):
    from monitor.actions import Actions

    return Actions(
        stack.replica_url(replica),
        stack.supervisor(),
        replica.program,
        stack.app.admin_token_file,
        stack.app.admin_token,
        stack.app.api_token,
        stack.monitor_for(replica).model_copy(update=cfg_overrides),
    )


def rolling_restart(stack: Stack, targets: list[Replica], timeout: float, say: Callable[[str], None]) -> bool:
    """Each replica in turn; never the next before the last is back in the pool. Stops at the first
    that does not come back: the others keep serving."""
    for replica in targets:
        others = [r.label for r in stack.replicas if r != replica]
        if not poll_until(lambda: all_in_pool(stack, others), IN_POOL_TIMEOUT_S, 0.25):
            say(
                f"{replica.label}: not restarted: another replica is not in the pool ({server_states(stack)})"
            )
            return False
        stack.set_maintenance(timeout + 30, "zimagectl restart", replica)
        try:
            say(f"{replica.label}: draining, stopping, starting, warming up")
            result = actions_for(stack, replica, warmup_ready_timeout_s=timeout).graceful_restart()
        finally:
            stack.clear_maintenance(replica)
        warm = result.warmup
        say(
            f"{replica.label}: pid {result.old_pid} → {result.new_pid} in {result.seconds:.1f} s; "
            + (warm.note() if warm else result.detail)
        )
        if not result.ok:
            return False
        if not poll_until(lambda: all_in_pool(stack, [replica.label]), IN_POOL_TIMEOUT_S, 0.25):
            say(f"{replica.label}: warm but not back in HAProxy's pool after {IN_POOL_TIMEOUT_S:.0f} s")
            return False
        say(f"{replica.label}: back in the pool")
    return True


def replica_report(stack: Stack) -> list[dict]:
    states = server_states(stack)
    rows = []
    for r in stack.replicas:
        url = stack.replica_url(r)
        health, ready = stack.healthz(url=url), stack.readyz(url=url)
        hb = (health or {}).get("heartbeat", {})
        mon = read_state(stack.monitor_for(r).state_file) or {}
        rows.append(
            {
                "replica": r.label,
                "url": url,
                "balancer": states.get(r.label, "?"),
                "engine": (health or {}).get("state", "not answering"),
                "ready": bool(ready and ready.get("ready")),
                "busy": hb.get("busy"),
                "queue_waiting": (health or {}).get("queue_waiting"),
                "incidents_open": [f"{i['kind']}: {i['reason']}" for i in mon.get("incidents_open", [])],
                "monitor_updated_s_ago": round(time.time() - mon["updated_at"], 1) if mon else None,
            }
        )
    return rows


def print_replicas(rows: list[dict], say: Callable[[str], None]) -> None:
    for row in rows:
        say(
            f"{row['replica']:<12}  balancer={row['balancer']:<6} engine={row['engine']} "
            f"ready={row['ready']} busy={row['busy']} queue={row['queue_waiting']}  {row['url']}"
        )
        for line in row["incidents_open"]:
            say(f"  incident    {line}")
