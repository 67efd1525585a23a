"""Read safetensors files straight into GPU memory at disk/PCIe speed, and build a model around them.

`from_pretrained(device_map="cuda")` reads each tensor through an mmap: 4 KiB page faults and one
small pageable copy per tensor. Here each file is read with large sequential reads into pinned
staging buffers by a few threads, each with its own CUDA stream, and scattered into the model's
tensors (one allocation each), which are then assigned to a model whose parameters were never
allocated (meta device). Used when everything is resident on one device (on a CPU the same chunks
are copied into host tensors); the offload modes keep the library's loader.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import json
import logging
import struct
import threading
import time
from pathlib import Path

import torch

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 64 * 2**20
READERS = 4
_EMPTY_INIT_LOCK = threading.Lock()
log = logging.getLogger("app.runtime.fastload")


def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_range(path: Path, lo: int, hi: int, data_start: int, targets: list, device: torch.device) -> None:
    """Read bytes [lo, hi) of the data section in chunks; copy each chunk's overlap with every
    target tensor into it. On a GPU through two pinned buffers on this reader's own stream, so a
    file read and a host→GPU copy are always in flight together."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    staging = [
        torch.empty(min(CHUNK, hi - lo), dtype=torch.uint8, pin_memory=cuda) for _ in range(2 if cuda else 1)
    ]
    done: list = [None] * len(staging)
    begins = [t[0] for t in targets]
    with open(path, "rb", buffering=0) as f, torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        f.seek(data_start + lo)
        pos, i = lo, 0
        while pos < hi:
            slot = i % len(staging)
            buf = staging[slot]
            if done[slot] is not None:
                done[slot].synchronize()  # that buffer's previous copies have left it
            want = min(buf.numel(), hi - pos)
            view = memoryview(buf.numpy())[:want]
            got = 0
            while got < want:
                n = f.readinto(view[got:])
                if not n:
                    raise EOFError(f"{path}: file ends at {data_start + pos + got}, header says more")
                got += n
            k = max(0, bisect.bisect_right(begins, pos) - 1)
            while k < len(targets) and targets[k][0] < pos + want:
                begin, end, dest = targets[k]
                a, b = max(begin, pos), min(end, pos + want)
                if a < b:
                    dest[a - begin : b - begin].copy_(buf[a - pos : b - pos], non_blocking=cuda)
                k += 1
            if cuda:
                done[slot] = torch.cuda.Event()
                done[slot].record(stream)
            pos, i = pos + want, i + 1
    if cuda:
        stream.synchronize()


def load_file(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of one file, each in its own allocation on `device` (aligned, freeable, the
    same memory as the library's loader uses)."""
    started = time.perf_counter()
    data_start, header = read_header(path)
    tensors, targets = {}, []
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device=device)
        if tensor.numel() * tensor.element_size() != end - begin:
            raise ValueError(
                f"{path}: {name} has {end - begin} bytes, its shape and dtype need "
                f"{tensor.numel() * tensor.element_size()}"
            )
        tensors[name] = tensor
        if end > begin:
            targets.append((begin, end, tensor.reshape(-1).view(torch.uint8)))
    total = max((t[1] for t in targets), default=0)
    step = max(4096, -(-total // READERS))
    step += (-step) % 4096  # page-aligned ranges, one per reader
    with cf.ThreadPoolExecutor(READERS, thread_name_prefix="safetensors") as pool:
        futures = [
            pool.submit(_read_range, path, lo, min(lo + step, total), data_start, targets, device)
            for lo in range(0, total, step)
        ]
        for future in futures:
            future.result()
    seconds = time.perf_counter() - started
    log.info(
        "read weights",
        extra={
            "event": "weights_read",
            "file": path.name,
            "gib": round(total / 2**30, 2),
            "seconds": round(seconds, 2),
            "gb_per_s": round(total / 1e9 / max(seconds, 1e-9), 2),
        },
    )
    return tensors


def load_state_dict(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:  # each file already uses several readers; files one after another bound memory
        state.update(load_file(path, device))
    return state


class Prefetch:
    """Component weights read in the background from the first moments of the process, while it
    imports the rest (diffusers, transformers, the web stack: on a GPU host the imports take longer
    than the reads; docs/PERFORMANCE.md). The loader takes them with take(); a failed read re-raises there."""

    def __init__(self, model_dir: Path, device: torch.device, names: tuple[str, ...]):
        self.model_dir = Path(model_dir)
        self._pool = cf.ThreadPoolExecutor(len(names), thread_name_prefix="prefetch")
        self._futures = {
            name: self._pool.submit(load_state_dict, self.model_dir / name, device) for name in names
        }
        self._pool.shutdown(wait=False)

    def take(self, model_dir: Path, name: str) -> "cf.Future | None":
        return self._futures.pop(name, None) if Path(model_dir) == self.model_dir else None


_prefetch: Prefetch | None = None


def start_prefetch(
    model_dir: Path, device: torch.device, names: tuple[str, ...] = ("transformer", "text_encoder")
) -> None:
    global _prefetch
    _prefetch = Prefetch(model_dir, device, names)


def take_prefetched(model_dir: Path, name: str) -> "cf.Future | None":
    return _prefetch.take(model_dir, name) if _prefetch else None


def discard_prefetch() -> None:
    global _prefetch
    _prefetch = None


def build_model(
    cls, folder: Path, device: torch.device, dtype: torch.dtype, reading: "cf.Future | None" = None
):
    """`cls` (a diffusers ModelMixin or a transformers PreTrainedModel) from `folder`'s config and
    weights, parameters on `device` in `dtype` (modules the class keeps in fp32 excepted), eval mode.
    `reading`: the weights already being read (a Prefetch), else they are read now."""
    from accelerate import init_empty_weights

    with cf.ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
        if reading is None:
            reading = pool.submit(load_state_dict, folder, device)  # the reads overlap the construction
        # init_empty_weights patches nn.Module.register_parameter process-wide, and assigning the
        # weights goes through register_parameter too: a second thread constructing meanwhile would
        # send them to meta (seen in the tests). Construction and assignment take turns; reads do not.
        with _EMPTY_INIT_LOCK:
            with init_empty_weights():  # parameters on meta: nothing allocated or initialised
                if hasattr(cls, "load_config"):  # diffusers
                    model = cls.from_config(cls.load_config(str(folder)))
                else:  # transformers
                    model = cls(cls.config_class.from_pretrained(str(folder)))
            state = reading.result()
            keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
            for name, tensor in state.items():
                if (
                    tensor.is_floating_point()
                    and tensor.dtype != dtype
                    and not keep_fp32 & set(name.split("."))
                ):
                    state[name] = tensor.to(dtype)
            _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # A weight the file lacks would stay on meta: refuse (the loader falls back to from_pretrained)
    # rather than serve a model with a hole in it.
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the config (missing {still_meta[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )
    model.to(device)  # buffers (made on the CPU, e.g. fp32 RoPE frequencies) follow, in their own dtype
    model.eval().requires_grad_(False)
    return model
