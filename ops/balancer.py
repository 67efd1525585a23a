"""HAProxy in front of the replicas: its config, written from zimage.toml, and its view of them.

Why each line is there (docs/SCALING.md has the whole story):
- `option httpchk GET /readyz` with a fast fall/rise: a replica that drains, warms up or hangs
  leaves the pool within about a second, and comes back once it answers 200 twice.
- `retry-on conn-failure empty-response junk-response response-timeout 503` with
  `option redispatch 1` and `option http-buffer-request`: a request whose replica died before
  answering (killed, restarted) or refused it (queue full, draining) is sent again, to another
  replica. The client sees an error only when every replica refused: then the last 503 with its
  Retry-After passes through. junk-response: a replica killed while its socket still held unread
  bytes answers with a reset, which HAProxy 2.6 counts as junk, not as an empty response; without it
  the request was not retried and, on a kept-alive client connection, HAProxy closed that
  connection without a word (its way of telling a client to retry; httpx does not for a POST).
- `tune.bufsize` ≥ the largest JSON body: only a request that fits one buffer can be retried;
  with the 16 KiB default every image-to-image request was a reset when its replica died.
- `balance leastconn`: a generation holds a connection for its whole length.
- `option abortonclose`: a client that closes its connection before its answer (it gave up, its tab
  closed) has its connection to the replica closed too, and the replica drops the job
  (app/web/service.py). Without it HAProxy kept the replica's connection, which made the images for
  nobody while the requests behind them waited. (A client that half-closes its side after sending
  the request counts as gone too; HTTP clients do not.)
- `observe layer4 error-limit 1 on-error mark-down`: the first refused connection takes a replica
  out of the pool at once. Without it a killed replica, having no connections, was leastconn's
  favourite until the checks caught up (up to a second), and the retries all went to it: the
  2-replica drill saw resets and HAProxy's own empty 503s. Found with `zimagectl drill --replicas 2`.
- HAProxy's own 502/503/504 carry a JSON reason and Retry-After, like the app's.
- A cookie pins a browser to one replica: Gradio's queue (join, then the event stream) must reach
  the process that holds the job. API clients without the cookie are balanced per request.
- /admin/* is refused at the balancer: the monitor talks to each replica directly.
- /api/jobs/r<i>-… goes to replica i, which holds that job (its events, its cancel).
- Stats and HAProxy's own Prometheus metrics on loopback only.
- `monitor-uri`: HAProxy answers it itself, for replica 0's monitor (balancer_down); a probe sent
  through to a replica would take part in the balancing it watches.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from common.replicas import BALANCER_ALIVE_PATH, CHECK_FALL, CHECK_INTERVAL_S

if TYPE_CHECKING:
    from ops.stack import Stack

CHECK_INTERVAL_MS = int(CHECK_INTERVAL_S * 1000)


# When no replica can take a request, HAProxy answers itself: in the app's shape (a JSON reason,
# Retry-After), so a client treats it as the app's own "busy" and tries again.
_OWN_ERRORS = {
    503: ("no_replica", "no replica could take the request; try again shortly"),
    502: ("bad_gateway", "a replica failed while answering; try again"),
    504: ("gateway_timeout", "no replica answered in time"),
}


def _own_errors() -> str:
    lines = []
    for status, (error, message) in _OWN_ERRORS.items():
        body = json.dumps({"error": error, "message": message}, separators=(",", ":"))
        kind = "content-type application/json"
        lines.append(f"    http-error status {status} {kind} string '{body}' hdr Retry-After 2\n")
    return "".join(lines)


def render(stack: "Stack") -> str:
    app = stack.app
    server_timeout = int(app.request_timeout_s) + 15  # the app answers 504 itself before this
    bind_host = app.host if app.host not in ("", "::") else "0.0.0.0"
    # HAProxy retries (retry-on) only a request that fits in one buffer (16 KiB by default): an
    # image-to-image request with its base64 image (up to max_body_bytes, 1 MiB) was not retried
    # when its replica died — the client got a reset. One buffer now holds any JSON body the app
    # accepts, up to 8 MiB (buffers are taken per active connection, not reserved per maxconn).
    # Multipart uploads (up to max_upload_mb) stay beyond it: not retried by the balancer.
    bufsize = max(16384, min(app.max_body_bytes + 16384, 8 * 2**20))
    checks = (
        f"inter {CHECK_INTERVAL_MS}ms fastinter {CHECK_INTERVAL_MS}ms downinter 1s fall {CHECK_FALL} rise 2"
    )
    servers = "\n".join(
        f"    server {r.label} 127.0.0.1:{r.port} cookie {r.label} check" for r in stack.replicas
    )
    # A job lives in the replica that took it; its id starts r<i>- (app/web/jobs.py).
    job_routes = "\n".join(
        f"    use-server {r.label} if {{ path_beg /api/jobs/r{r.index}- }}" for r in stack.replicas
    )
    return f"""# Written by zimagectl from zimage.toml ([app] replicas, port, replica_base_port,
# balancer_stats_port); edits here are overwritten at the next `zimagectl up`. Why: ops/balancer.py.
global
    # info: a session that went wrong (error, timeout, retry, redispatch, 5xx) is logged with its
    # termination state — what tells a reset apart from a retry; normal ones are not (dontlog-normal).
    log stdout format raw local0 info
    maxconn 4096
    tune.bufsize {bufsize}
    stats socket {stack.home}/run/haproxy.sock mode 600 level admin

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option dontlog-normal
    timeout connect 2s
    timeout client {server_timeout}s
    timeout server {server_timeout}s
    timeout http-request 30s
    timeout queue 30s
    timeout check 2s
    retries 3
    option redispatch 1
    option http-buffer-request
    option abortonclose
    retry-on conn-failure empty-response junk-response response-timeout 503
{_own_errors()}
frontend zimage
    bind {bind_host}:{app.port}
    monitor-uri {BALANCER_ALIVE_PATH}
    http-request deny deny_status 403 if {{ path_beg /admin }}
    default_backend replicas

backend replicas
    balance leastconn
    # A fresh connection per request (loopback: tens of microseconds). On a reused idle connection
    # that the replica closes as it restarts, HAProxy does not retry a POST: it closes the client's
    # connection instead, for a browser to retry — an API client saw a reset (the 2-replica drill's OOM row).
    http-reuse never
    cookie zimage_replica insert indirect nocache httponly
    option httpchk GET /readyz
    http-check expect status 200
    # A killed replica refuses connections at once, but the checks need up to a second to see it,
    # and leastconn prefers it meanwhile (it has no connections): the retries all went to it and
    # clients got HAProxy's 503, some with an empty body (the drill with 2 replicas). The first
    # refused connection now takes it out of the pool; the checks bring it back (rise 2).
    default-server {checks}
    default-server observe layer4 error-limit 1 on-error mark-down
{job_routes}
{servers}

listen stats
    bind 127.0.0.1:{app.balancer_stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
"""


def all_in_pool(stack: "Stack", labels: list[str] | None = None) -> bool:
    """Whether HAProxy routes to each of `labels` (every replica by default): its checks passed."""
    states = server_states(stack)
    wanted = labels if labels is not None else [r.label for r in stack.replicas]
    return all(states.get(label, "").startswith("UP") for label in wanted)


def config_path(stack: "Stack") -> Path:
    return stack.home / "run" / "haproxy.cfg"


def write_config(stack: "Stack") -> Path:
    path = config_path(stack)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(stack))
    tmp.replace(path)
    return path


def server_states(stack: "Stack", timeout: float = 2.0) -> dict[str, str]:
    """HAProxy's view of each replica ("UP", "DOWN", "UP 1/2", "MAINT", ...), {} when it does not answer."""
    url = f"http://127.0.0.1:{stack.app.balancer_stats_port}/stats;csv"
    try:
        text = httpx.get(url, timeout=timeout).text
    except httpx.HTTPError:
        return {}
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {
        row["svname"]: row["status"]
        for row in rows
        if row.get("pxname") == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
    }
