"""GPU readings through NVML (nvidia-ml-py, `import pynvml`), behind one small interface.

`open_gpu_reader()` returns an NvmlReader when NVML initialises, else a NoGpuReader that says why;
nothing here raises because a GPU or the NVML library is missing. Machines without a GPU (CI) run
the NoGpuReader path; the NVML path is exercised on the lent GPU (ops/lab/gpu_check.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Optional, Protocol

log = logging.getLogger("common.gpu")


@dataclass
class GpuSample:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    utilization_pct: Optional[int] = None
    temperature_c: Optional[int] = None
    process_used_bytes: dict[int, int] = field(default_factory=dict)  # pid → bytes on this device

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "used_bytes": self.used_bytes,
            "total_bytes": self.total_bytes,
            "used_fraction": round(self.used_fraction, 4),
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "process_used_bytes": {str(k): v for k, v in self.process_used_bytes.items()},
        }


class GpuReader(Protocol):
    available: bool
    reason: str

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class NoGpuReader:
    available = False

    def __init__(self, reason: str):
        self.reason = reason

    def sample(self) -> list[GpuSample]:
        return []

    def close(self) -> None:
        pass


class NvmlReader:
    available = True
    reason = "nvml"

    def __init__(self, pynvml_module, indices: Optional[list[int]] = None):
        self.nvml = pynvml_module
        count = self.nvml.nvmlDeviceGetCount()
        self.indices = indices if indices is not None else list(range(count))
        self._handles = {i: self.nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
        self._lock = threading.Lock()  # NVML is thread-safe, but our handle dict is shared

    def sample(self) -> list[GpuSample]:
        nv = self.nvml
        samples = []
        with self._lock:
            for index, handle in self._handles.items():
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                name = nv.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else name
                util = temp = None
                try:
                    util = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nv.NVMLError:
                    pass
                try:
                    temp = int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
                except nv.NVMLError:
                    pass
                per_process: dict[int, int] = {}
                try:
                    for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                        used = proc.usedGpuMemory
                        if used is not None:  # None when the driver cannot attribute (some containers)
                            per_process[int(proc.pid)] = int(used)
                except nv.NVMLError:
                    pass
                samples.append(
                    GpuSample(
                        index=index,
                        name=name,
                        used_bytes=int(mem.used),
                        total_bytes=int(mem.total),
                        utilization_pct=util,
                        temperature_c=temp,
                        process_used_bytes=per_process,
                    )
                )
        return samples

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def open_gpu_reader(indices: Optional[list[int]] = None) -> GpuReader:
    """NVML when it works; otherwise a reader that reports no GPU and the reason."""
    try:
        import pynvml
    except ImportError:
        return NoGpuReader("nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NoGpuReader(f"NVML unavailable: {exc}")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pynvml.nvmlShutdown()
            return NoGpuReader("NVML reports no GPU")
        return NvmlReader(pynvml, indices)
    except Exception as exc:
        return NoGpuReader(f"NVML error: {exc}")
