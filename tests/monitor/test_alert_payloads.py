import json

from monitor.alert_payloads import alertmanager_payload, generic_payload, render, sign, verify, slack_payload

INCIDENT = {"id": "inc-1", "kind": "hang", "severity": "critical", "reason": "stopped", "started_at": 1_800_000_000,
            "resolved_at": None, "count": 2, "actions": ["kill"], "evidence": {"pid": 5}}


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
    assert render("generic", g) is g


def test_signature_is_hmac_sha256_of_the_exact_body():
    body = json.dumps({"a": 1}).encode()
    sig = sign(body, "s3cret")
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify(body, "s3cret", sig)
    assert not verify(body + b" ", "s3cret", sig)
    assert not verify(body, "other", sig)
