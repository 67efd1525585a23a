"""A finding: what a detector saw, how bad it is and the tier it asks for. Its own module so the
detectors (monitor/detectors.py, monitor/memory_detectors.py), the policy and the incident book
share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.enums import Action, FindingKind, Severity


@dataclass
class Finding:
    kind: FindingKind
    severity: Severity
    reason: str  # one sentence for humans
    action: Action  # the tier this finding asks for
    evidence: dict = field(default_factory=dict)
