"""Incidents: one per problem kind while it lasts, with a firing and a resolved edge. Repeats of an
open incident only bump its count (no new alert). Pure; the loop passes the clock."""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Optional

from common.enums import Severity
from monitor.findings import Finding

# Incidents that resolve by an operator's hand or the event that ends them, not by quiet samples.
HELD_KINDS = ("restart_budget_exhausted",)


@dataclass
class Incident:
    id: str
    kind: str
    severity: str
    reason: str
    evidence: dict
    started_at: float  # wall clock
    first_seen: float  # monotonic
    last_seen: float
    count: int = 1
    actions: list[str] = field(default_factory=list)
    status: str = "firing"
    resolved_at: Optional[float] = None
    resolution: Optional[str] = None
    awaiting_warmup: bool = False
    quiet: int = 0

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("quiet")
        return data


class IncidentBook:
    def __init__(self, keep: int = 50):
        self.open: dict[str, Incident] = {}
        self.closed: deque[Incident] = deque(maxlen=keep)

    def observe(self, finding: Finding, now: float, wall: float) -> Optional[Incident]:
        """Record a finding; return the incident when this opens it (the moment to send 'firing')."""
        current = self.open.get(finding.kind)
        if current is not None:
            current.count += 1
            current.last_seen = now
            current.quiet = 0
            if Severity.of(finding.severity).rank > Severity.of(current.severity).rank:
                current.severity = finding.severity
            return None
        incident = Incident(
            id=f"inc-{uuid.uuid4().hex[:12]}",
            kind=finding.kind,
            severity=finding.severity,
            reason=finding.reason,
            evidence=dict(finding.evidence),
            started_at=wall,
            first_seen=now,
            last_seen=now,
        )
        self.open[finding.kind] = incident
        return incident

    def note_action(self, kind: str, action: str, awaiting_warmup: bool = False) -> None:
        incident = self.open.get(kind)
        if incident is not None:
            incident.actions.append(action)
            incident.awaiting_warmup = incident.awaiting_warmup or awaiting_warmup

    def warmed_up(self, note: str) -> None:
        for incident in self.open.values():
            if incident.awaiting_warmup:
                incident.awaiting_warmup = False
                incident.evidence["warmup"] = note

    def settle(
        self,
        seen_kinds: set[str],
        app_ready: bool,
        quiet_samples: int,
        wall: float,
        resolution: str = "condition cleared and app ready",
    ) -> list[Incident]:
        """Count clean samples for open incidents; return those that are now resolved."""
        resolved = []
        for kind, incident in list(self.open.items()):
            if kind in seen_kinds or kind in HELD_KINDS or incident.awaiting_warmup or not app_ready:
                incident.quiet = 0
                continue
            incident.quiet += 1
            if incident.quiet >= quiet_samples:
                resolved.append(self.resolve(kind, wall, resolution))
        return resolved

    def resolve(self, kind: str, wall: float, resolution: str) -> Incident:
        incident = self.open.pop(kind)
        incident.status, incident.resolved_at, incident.resolution = "resolved", wall, resolution
        self.closed.append(incident)
        return incident
