"""Error texts both processes act on. The app marks itself unhealthy on a fatal one (only a new
process helps once the CUDA context is broken); the monitor restarts on a line with either kind."""

from __future__ import annotations

# After these the CUDA context cannot be trusted.
FATAL_CUDA_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDA error: an illegal instruction",
    "uncorrectable ECC error",
    "CUDA error: unknown error",
)
# Out of memory: the app survives these (it frees its cache and fails one request); a line in the
# log means it happened anyway, and the monitor's next tier is a graceful restart.
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")
