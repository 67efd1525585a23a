"""Errors a generation can end with, each carrying the HTTP status and the words a user can act on."""

from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, hint: Optional[str] = None, retry_after_s: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retry_after_s = retry_after_s


class QueueFull(ServiceError):
    status = 503
    code = "queue_full"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class Draining(ServiceError):
    status = 503
    code = "draining"


class OutOfMemory(ServiceError):
    status = 507
    code = "out_of_memory"


class GenerationTimeout(ServiceError):
    status = 504
    code = "timeout"


class InvalidImage(ServiceError):
    status = 422
    code = "invalid_image"


class Cancelled(ServiceError):
    status = 409
    code = "cancelled"


class ClientGone(ServiceError):
    """The client closed its connection before its images were ready. Nobody reads this answer: the
    status is for the access log and the metrics (nginx's 499, "client closed request")."""

    status = 499
    code = "client_closed_request"


class GenerationFailed(ServiceError):
    status = 500
    code = "generation_failed"


class EngineUnhealthy(ServiceError):
    status = 503
    code = "engine_unhealthy"


class StorageError(ServiceError):
    status = 507
    code = "storage_error"


class UnknownLora(ServiceError):
    status = 422
    code = "unknown_lora"


class InvalidLora(ServiceError):
    status = 422
    code = "invalid_lora"
