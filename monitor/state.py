"""The monitor state machine's vocabulary (monitor/core.py is its one transition function): the
events that go in, the effects that come out, and the state that is persisted between steps
(monitor/journal.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from common.enums import Action
from monitor import policy as pol
from monitor.incidents import IncidentBook
from monitor.samples import Sample


# ---- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observe:
    sample: Sample
    maintenance: Optional[dict] = None  # an operator's window (zimagectl down/restart): observe, do not heal


@dataclass(frozen=True)
class ActionDone:
    action: str
    ok: bool
    seconds: float
    detail: str = ""
    warmup_ok: Optional[bool] = None  # None: no warm-up was run (free_cache)
    warmup_note: str = ""
    old_pid: int = 0
    new_pid: int = 0
    deferred: bool = False  # not carried out (rolling heal): nothing changed, the next tick decides


@dataclass(frozen=True)
class Delivered:
    seq: int
    target: int
    outcome: str  # delivered | rejected (the receiver refused this body) | expired (outbox age)
    detail: str = ""


@dataclass(frozen=True)
class OperatorReset:
    """SIGHUP or zimagectl restart: close the circuit, forget the restarts in the window."""


Event = Union[Observe, ActionDone, Delivered, OperatorReset]


# ---- effects ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunAction:
    action: Action
    kind: str
    incident_id: Optional[str]
    target_pid: int  # the process the action is aimed at (0: none running)
    resumed: bool = False  # rolled forward after the monitor died in the middle of it


@dataclass(frozen=True)
class LogLine:
    level: int
    message: str
    fields: dict = field(default_factory=dict)


Effect = Union[RunAction, LogLine]


# ---- state -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PendingAction:
    action: str
    kind: str
    incident_id: Optional[str]
    target_pid: int
    since: float


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    status: str  # firing | resolved
    incident: dict  # the incident as it was when the alert was decided
    action: Optional[str]
    queued_at: float
    targets: tuple[int, ...]  # webhook targets (indexes) that still have to take it


@dataclass(frozen=True)
class MonitorState:
    policy: pol.PolicyState = field(default_factory=pol.PolicyState)
    book: IncidentBook = field(default_factory=IncidentBook)
    pending: Optional[PendingAction] = None
    known_pid: int = 0
    expect_new_pid: bool = False  # set by our own restarts: that pid change is not a crash
    # The supervisord known_pid was seen under ("pid:start time"): a pid of another one is no crash.
    supervisord: str = ""
    unexpected_restarts: tuple[float, ...] = ()
    outbox: tuple[OutboxItem, ...] = ()
    next_seq: int = 1
    alerted: tuple[str, ...] = ()  # "incident_id:status" already queued: never twice
    log_position: Optional[dict] = None
    restart_log: tuple[dict, ...] = ()
    last_decision: Optional[dict] = None
    last_logged: Optional[tuple[str, str]] = None  # (action, kind) of the last decision logged
    # Not persisted: the detectors' window, rebuilt from new samples after a restart.
    history: tuple[Sample, ...] = ()


def under_supervisord(state: MonitorState, identity: str) -> MonitorState:
    """The journal's state for a monitor started by the supervisord `identity`. A journal written
    under another supervisord (`zimagectl down` then `up`, a reboot) names an app pid of that earlier
    stack: the fresh app's new pid is no crash, so the pid is forgotten rather than compared.
    Everything else carries over (open incidents, the outbox, the budget). No identity (supervisord
    not answering): nothing is known, nothing changes."""
    if not identity or identity == state.supervisord:
        return state
    if state.supervisord:  # an earlier stack's journal
        return dataclasses.replace(state, supervisord=identity, known_pid=0, expect_new_pid=False)
    return dataclasses.replace(state, supervisord=identity)  # a journal from before identities
