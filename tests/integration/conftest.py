"""Fixtures the integration tests share."""

import pytest

from ops.tempstack import StackHome, WebhookReceiver


@pytest.fixture(scope="module")
def receiver():
    """A real local webhook receiver for one module's stack; it records every alert posted to it."""
    r = WebhookReceiver()
    yield r
    r.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on a stack shows what that stack's processes said last (supervisord, the app, the
    monitor: the latest lines of each, cut short): a failure seen only in CI, where just the tail of
    the output is kept, is diagnosed from its report, not guessed at."""
    report = yield
    if report.when == "call" and report.failed:
        for name in item.fixturenames:
            stack = getattr(item, "funcargs", {}).get(name)
            if isinstance(stack, StackHome):
                report.sections.append((f"latest log lines of {name}", log_tails(stack)))
    return report


def log_tails(stack: StackHome, lines: int = 12, width: int = 220) -> str:
    out = []
    for log_name in stack.log_names():
        out.append(f"--- {log_name} ---")
        out += [line[:width] for line in stack.log(log_name).splitlines()[-lines:]]
    return "\n".join(out)
