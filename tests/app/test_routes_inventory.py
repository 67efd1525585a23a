"""Security by inventory: every route of the assembled app (FastAPI's and the mounted Gradio app's)
is on the public list or refuses a request without the token. A route added later (uploads, jobs,
history) fails here until it is either protected or consciously made public. In-process: the
engine is never started, so this runs in seconds."""

import re

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route, WebSocketRoute

from app.config import load_settings
from app.web.api import create_app
from app.web.auth import COOKIE, PUBLIC_PATHS, session_value

TOKEN = "inventory-test-token-0123456789"
# Public without the api token, and why. Everything else must refuse.
PUBLIC = PUBLIC_PATHS  # probes, metrics (loopback by default), login/logout
OWN_TOKEN = re.compile(r"^/admin/")  # the monitor's levers: the admin token, checked by the route


def settings(tmp_path, **extra):
    (tmp_path / "none.toml").write_text("")
    env = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_HOME": str(tmp_path)}
    return load_settings(env, api_token=TOKEN, admin_token_file=tmp_path / "admin.token", **extra)


def walk(routes, prefix=""):
    """(path, methods, kind) for every route, descending into mounts (Gradio is mounted at /) and
    included routers (Gradio's /gradio_api/* is one; FastAPI keeps them as a lazy branch)."""
    for route in routes:
        if isinstance(route, Mount):
            yield from walk(route.routes, prefix + route.path)
        elif hasattr(route, "original_router"):  # fastapi.routing._IncludedRouter
            yield from walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Route):
            yield prefix + route.path, sorted(route.methods or {"GET"}), "http"
        elif isinstance(route, WebSocketRoute):
            yield prefix + route.path, ["GET"], "websocket"


def concrete(path: str) -> str:
    """A request path for a route template: every {param} (and {param:path}) gets a plausible value."""
    return re.sub(r"\{[^}]+\}", "x1", path).replace("//", "/") or "/"


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    app = create_app(settings(tmp_path_factory.mktemp("inv")), with_ui=True)
    return app, list(walk(app.routes))


def test_the_inventory_sees_the_whole_app(assembled):
    _, routes = assembled
    paths = {path for path, _, _ in routes}
    # Both sides are walked: the API's own routes and Gradio's (queue, file, upload, config).
    assert {"/api/generate", "/outputs/{name}", "/healthz", "/admin/drain"} <= paths
    assert any(p.startswith("/gradio_api/queue") for p in paths)
    assert any("upload" in p for p in paths) and any("file=" in p for p in paths)
    assert len(routes) > 40, len(routes)


def test_every_route_is_public_or_refuses_without_the_token(assembled):
    app, routes = assembled
    client = TestClient(app, raise_server_exceptions=False)
    checked, open_routes = 0, []
    for path, methods, kind in routes:
        url = concrete(path)
        if path in PUBLIC:
            continue
        for method in methods:
            if method == "HEAD":
                continue
            if kind == "websocket":
                with pytest.raises(Exception):
                    with client.websocket_connect(url):
                        pass
                checked += 1
                continue
            r = client.request(method, url, headers={"accept": "application/json"})
            checked += 1
            if r.status_code not in (401, 403):
                open_routes.append(f"{method} {path} -> {r.status_code}")
    assert open_routes == [], "routes answering without a token:\n" + "\n".join(open_routes)
    assert checked > 40


def test_a_wrong_token_or_cookie_is_refused_and_the_right_ones_pass(assembled):
    app, _ = assembled
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    for wrong in (session_value("wrong"), TOKEN):  # the raw token is no session cookie either
        client.cookies.set(COOKIE, wrong)
        assert client.get("/config").status_code == 401
    client.cookies.clear()
    r = client.get("/outputs/none.png", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404  # past the gate: the route itself answers
    client.cookies.set(COOKIE, session_value(TOKEN))
    assert client.get("/config").status_code == 200
    client.cookies.clear()


def test_admin_routes_check_their_own_token_not_the_api_token(assembled):
    app, routes = assembled
    client = TestClient(app, raise_server_exceptions=False)
    admin = [(p, m) for p, methods, _ in routes if OWN_TOKEN.match(p) for m in methods]
    assert admin
    for path, method in admin:
        # The api token does not open the monitor's levers.
        r = client.request(method, path, headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 401, (path, r.status_code)


def test_a_browser_is_sent_to_the_login_page_and_logs_in(assembled):
    app, _ = assembled
    client = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    r = client.get("/?__theme=dark", headers={"accept": "text/html,application/xhtml+xml"})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F%3F__theme%3Ddark"
    page = client.get("/login?next=/%3F__theme%3Ddark")
    assert page.status_code == 200 and 'name="token"' in page.text and 'value="/?__theme=dark"' in page.text
    bad = client.post("/login", data={"token": "nope", "next": "/"})
    assert bad.status_code == 401 and "not right" in bad.text and "set-cookie" not in bad.headers
    good = client.post("/login", data={"token": TOKEN, "next": "/?__theme=dark"})
    assert good.status_code == 303 and good.headers["location"] == "/?__theme=dark"
    cookie = good.headers["set-cookie"]
    assert f"{COOKIE}={session_value(TOKEN)}" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    out = client.get("/logout")
    assert out.status_code == 303 and f"{COOKIE}=;" in out.headers["set-cookie"]


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "evil"])
def test_login_never_redirects_off_site(assembled, target):
    app, _ = assembled
    client = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    r = client.post("/login", data={"token": TOKEN, "next": target})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_without_a_token_configured_the_api_is_open(tmp_path):
    (tmp_path / "none.toml").write_text("")
    s = load_settings({"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_HOME": str(tmp_path)})
    client = TestClient(create_app(s, with_ui=False), raise_server_exceptions=False)
    assert client.get("/outputs/none.png").status_code == 404  # not 401: open by the operator's choice
    assert client.get("/login").status_code == 404  # no login page when there is nothing to log in to
