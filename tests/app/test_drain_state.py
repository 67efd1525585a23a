"""The drain as /healthz reports it: since when (the monitor tells a drain someone is finishing from
one whose driver died), kept from the first call, lifted by the admin, and never lifted once the
process is exiting on SIGTERM (that would put it back in a balancer's pool). In-process; the engine
is not started (the drain is the server's state, not the engine's)."""

import time

from fastapi.testclient import TestClient

from app.config import load_settings
from app.web.api import create_app
from common.tokenfile import bearer_headers, read_token


def test_the_drain_says_since_when_and_a_shutdown_keeps_it(tmp_path):
    (tmp_path / "none.toml").write_text("")
    env = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_HOME": str(tmp_path)}
    app = create_app(load_settings(env, admin_token_file=tmp_path / "admin.token"), with_ui=False)
    client = TestClient(app, raise_server_exceptions=False)
    admin = bearer_headers(read_token(tmp_path / "admin.token"))

    def drain(enable: bool):
        return client.post("/admin/drain", json={"enable": enable}, headers=admin)

    health = client.get("/healthz").json()
    assert health["draining"] is False and health["draining_since"] is None

    before = time.time()
    assert drain(True).json()["draining"] is True
    since = client.get("/healthz").json()["draining_since"]
    assert before <= since <= time.time()
    assert drain(True).status_code == 200 and client.get("/healthz").json()["draining_since"] == since
    assert client.get("/readyz").json()["draining"] is True

    assert drain(False).json()["draining"] is False
    assert client.get("/healthz").json()["draining_since"] is None

    app.state.service.begin_shutdown()  # what the server does on SIGTERM
    refused = drain(False)
    assert refused.status_code == 409 and refused.json()["error"] == "shutting_down", refused.text
    assert client.get("/healthz").json()["draining"] is True
    assert client.post("/admin/drain", json={"enable": False}).status_code == 401  # no token


def test_a_drain_in_a_pool_lasts_until_the_balancer_has_let_go(monkeypatch):
    """An idle replica of a pool does not exit at SIGTERM's first tick: HAProxy's checks need
    POOL_LEAVE_S to take it out, and meanwhile its retries must find a 503 here, not a refused port."""
    import asyncio

    import uvicorn

    from app.web import server as server_module
    from common.replicas import POOL_LEAVE_S

    class IdleService:
        in_flight = 0

        def begin_shutdown(self):
            pass

        def idle(self):
            return True

    now = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])

    def exits_after(drain_min_s: float) -> list[float]:
        server = server_module.DrainingServer(uvicorn.Config(app=None), IdleService(), 150.0, drain_min_s)
        server.handle_exit(15, None)
        start, exited = now[0], []
        for tick in range(40):
            asyncio.run(server.on_tick(tick))
            if server.should_exit:
                exited.append(round(now[0] - start, 2))
                break
            now[0] += 0.1
        return exited

    assert exits_after(0.0) == [0.0]  # alone: idle is done at once
    assert exits_after(POOL_LEAVE_S) == [POOL_LEAVE_S] and POOL_LEAVE_S >= 1.5
