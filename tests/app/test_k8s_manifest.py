"""deploy/k8s/zimage-serve.yaml: it parses, and its probes name the app's real endpoints with the
meaning each has (liveness on /healthz, startup and readiness on /readyz), and the pod waits as
long as supervisord does for a drain."""

import configparser
from pathlib import Path

import yaml

from app.config import load_settings
from app.web.api import create_app
from monitor.config import MonitorSettings

REPO = Path(__file__).resolve().parents[2]


def documents():
    return list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "zimage-serve.yaml").read_text()))


def test_the_manifest_parses_into_a_deployment_and_a_service():
    kinds = [d["kind"] for d in documents()]
    assert kinds == ["Deployment", "Service"]


def test_the_probes_are_the_apps_endpoints(tmp_path):
    (tmp_path / "none.toml").write_text("")
    app = create_app(load_settings({"ZIMAGE_CONFIG": str(tmp_path / "none.toml")}), with_ui=False)
    routes = {route.path for route in app.routes}
    deployment = documents()[0]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    app_container = containers["zimage-serve"]
    assert "supervisord" in app_container["command"][0] and "-n" in app_container["command"]
    probes = {
        name: app_container[name]["httpGet"]["path"]
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    # startup on /readyz: /healthz answers while the model loads, so it would pass a stuck load
    assert probes == {"startupProbe": "/readyz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert set(probes.values()) <= routes
    startup = app_container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert window >= 600  # a first start compiles
    # a stuck start is paged by the monitor (not_ready) before Kubernetes kills the pod
    assert window > MonitorSettings.model_fields["ready_timeout_s"].default
    assert app_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_grace_period_covers_a_drain():
    parser = configparser.RawConfigParser()
    parser.read(REPO / "supervisor" / "app.conf")
    stopwaitsecs = int(parser.get("program:app", "stopwaitsecs"))
    grace = documents()[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= stopwaitsecs
