"""Fixtures the integration tests share."""

import pytest

from ops.tempstack import WebhookReceiver


@pytest.fixture(scope="module")
def receiver():
    """A real local webhook receiver for one module's stack; it records every alert posted to it."""
    r = WebhookReceiver()
    yield r
    r.stop()
