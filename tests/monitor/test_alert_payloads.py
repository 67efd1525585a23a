import json

from monitor.alert_payloads import alertmanager_payload, generic_payload, render, sign, slack_payload, verify
from monitor.config import WebhookTarget

INCIDENT = {
    "id": "inc-1",
    "kind": "hang",
    "severity": "critical",
    "reason": "stopped",
    "started_at": 1_800_000_000,
    "resolved_at": None,
    "count": 2,
    "actions": ["kill"],
    "evidence": {"pid": 5},
}


def test_generic_payload_has_the_fields_on_call_needs():
    g = generic_payload(INCIDENT, "firing", "kill", "zimage-serve", "gpu-01")
    for key in ("incident_id", "status", "severity", "reason", "host", "service", "evidence", "action"):
        assert key in g
    assert g["status"] == "firing" and g["evidence"] == {"pid": 5} and g["started_at"].endswith("Z")


def test_slack_and_alertmanager_formats():
    g = generic_payload(INCIDENT, "firing", "kill", "svc", "h")
    s = slack_payload(g)
    assert "FIRING" in s["text"] and s["attachments"][0]["fields"]
    (am,) = alertmanager_payload(g)
    assert am["labels"]["alertname"] == "ZImage_hang" and "endsAt" not in am
    resolved = generic_payload({**INCIDENT, "resolved_at": 1_800_000_100}, "resolved", None, "svc", "h")
    assert alertmanager_payload(resolved)[0]["endsAt"].startswith("2027")
    assert render(WebhookTarget(url="http://x/"), g) is g
    assert render(WebhookTarget(url="http://x/", format="slack"), g) == s


def test_pagerduty_events_v2_trigger_and_resolve_share_the_dedup_key():
    target = WebhookTarget(
        url="https://events.pagerduty.com/v2/enqueue", format="pagerduty", routing_key="R0UT1NG"
    )
    trigger = render(target, generic_payload(INCIDENT, "firing", "kill", "zimage-serve", "gpu-01"))
    assert trigger["event_action"] == "trigger" and trigger["routing_key"] == "R0UT1NG"
    assert trigger["dedup_key"] == "inc-1"
    payload = trigger["payload"]
    assert (
        payload["severity"] == "critical" and payload["source"] == "gpu-01" and "hang" in payload["summary"]
    )
    resolved = {**INCIDENT, "resolved_at": 1_800_000_100}
    resolve = render(target, generic_payload(resolved, "resolved", None, "zimage-serve", "gpu-01"))
    assert resolve == {"routing_key": "R0UT1NG", "dedup_key": "inc-1", "event_action": "resolve"}


def test_every_format_carries_the_incident_as_its_dedup_key():
    g = generic_payload(INCIDENT, "firing", "kill", "svc", "h")
    assert g["dedup_key"] == "inc-1" and alertmanager_payload(g)[0]["labels"]["incident_id"] == "inc-1"


def test_signature_is_hmac_sha256_of_the_exact_body():
    body = json.dumps({"a": 1}).encode()
    sig = sign(body, "s3cret")
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify(body, "s3cret", sig)
    assert not verify(body + b" ", "s3cret", sig)
    assert not verify(body, "other", sig)
