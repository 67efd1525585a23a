"""Alert bodies in four formats (generic JSON, Slack, Alertmanager, PagerDuty Events v2) and their HMAC
signature. Pure. Every format carries the incident id as its deduplication key (generic `dedup_key`,
Alertmanager's labels, PagerDuty's `dedup_key`): a receiver that gets an alert twice (a monitor
killed between delivering and recording it) folds the two into one."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Optional

SIGNATURE_HEADER = "X-Signature-256"
COLORS = {"critical": "#d00000", "error": "#e85d04", "warning": "#ffba08", "info": "#3a86ff"}


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def generic_payload(incident: dict, status: str, action: Optional[str], service: str, host: str) -> dict:
    return {
        "version": 1,
        "incident_id": incident["id"],
        "dedup_key": incident["id"],
        "status": status,  # firing | resolved
        "severity": incident["severity"],
        "kind": incident["kind"],
        "reason": incident["reason"],
        "service": service,
        "host": host,
        "started_at": _iso(incident["started_at"]),
        "resolved_at": _iso(incident.get("resolved_at")),
        "count": incident.get("count", 1),
        "action": action,
        "actions": incident.get("actions", []),
        "resolution": incident.get("resolution"),
        "evidence": incident.get("evidence", {}),
        "sent_at": _iso(time.time()),
    }


def slack_payload(generic: dict) -> dict:
    icon = ":white_check_mark:" if generic["status"] == "resolved" else ":rotating_light:"
    title = (
        f"{icon} [{generic['status'].upper()}] {generic['service']} on {generic['host']}: {generic['kind']}"
    )
    fields = [
        {"title": "Severity", "value": generic["severity"], "short": True},
        {"title": "Incident", "value": generic["incident_id"], "short": True},
    ]
    if generic.get("action"):
        fields.append({"title": "Action", "value": generic["action"], "short": True})
    if generic.get("resolution"):
        fields.append({"title": "Resolution", "value": generic["resolution"], "short": False})
    return {
        "text": f"{title}\n{generic['reason']}",
        "attachments": [
            {
                "color": "#2eb886"
                if generic["status"] == "resolved"
                else COLORS.get(generic["severity"], "#808080"),
                "fields": fields,
                "footer": f"started {generic['started_at']}",
            }
        ],
    }


def alertmanager_payload(generic: dict) -> list:
    """Alertmanager's POST /api/v2/alerts body: resolved alerts carry endsAt."""
    alert = {
        "labels": {
            "alertname": f"ZImage_{generic['kind']}",
            "severity": generic["severity"],
            "service": generic["service"],
            "instance": generic["host"],
            "incident_id": generic["incident_id"],
        },
        "annotations": {
            "summary": generic["reason"],
            "description": json.dumps(generic["evidence"], default=str)[:2000],
            "action": generic.get("action") or "",
        },
        "startsAt": generic["started_at"],
    }
    if generic["status"] == "resolved":
        alert["endsAt"] = generic["resolved_at"] or generic["sent_at"]
    return [alert]


PAGERDUTY_SEVERITY = {"critical": "critical", "error": "error", "warning": "warning", "info": "info"}


def pagerduty_payload(generic: dict, routing_key: Optional[str]) -> dict:
    """PagerDuty Events API v2 (POST https://events.pagerduty.com/v2/enqueue): trigger on firing,
    resolve on resolved, the same dedup_key for both. PagerDuty answers 429/5xx to slow down: the
    courier retries those, as it does for every receiver."""
    event = {
        "routing_key": routing_key or "",
        "dedup_key": generic["dedup_key"],
        "event_action": "resolve" if generic["status"] == "resolved" else "trigger",
    }
    if event["event_action"] == "trigger":
        event["payload"] = {
            "summary": f"{generic['service']} on {generic['host']}: {generic['kind']}: {generic['reason']}"[
                :1024
            ],
            "source": generic["host"],
            "severity": PAGERDUTY_SEVERITY.get(generic["severity"], "error"),
            "timestamp": generic["started_at"],
            "component": generic["service"],
            "class": generic["kind"],
            "custom_details": {
                "action": generic.get("action"),
                "actions": generic.get("actions"),
                "evidence": generic.get("evidence"),
                "incident_id": generic["incident_id"],
            },
        }
    return event


def render(target, generic: dict):
    """The body for one webhook target (monitor.config.WebhookTarget: its format and routing key)."""
    if target.format == "slack":
        return slack_payload(generic)
    if target.format == "alertmanager":
        return alertmanager_payload(generic)
    if target.format == "pagerduty":
        return pagerduty_payload(generic, target.routing_key)
    return generic


def sign(body: bytes, secret: str) -> str:
    """GitHub-style: 'sha256=' + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header_value: str) -> bool:
    return hmac.compare_digest(sign(body, secret), header_value or "")
