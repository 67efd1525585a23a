"""Read safetensors files straight into GPU memory at disk/PCIe speed, and build a model around them.

`from_pretrained(device_map="cuda")` reads each tensor through an mmap: 4 KiB page faults and one
small pageable copy per tensor. On the H100 that read the 19 GiB Z-Image directory at about
1.2 GB/s (15.8 s, most of a 42 s start). Here each file is read with large sequential reads into
pinned staging buffers by a few threads, each with its own CUDA stream, into one GPU buffer per file;
the tensors are views into that buffer, assigned to a model whose parameters were never allocated
(meta device). Used when everything is resident on one device (on a CPU it reads straight into
host memory); the offload modes keep the library's loader.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import struct
import threading
from pathlib import Path

import torch

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CHUNK = 64 * 2**20
READERS = 4
_EMPTY_INIT_LOCK = threading.Lock()


def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_range(path: Path, file_offset: int, dest: torch.Tensor) -> None:
    """Copy dest.numel() bytes of `path` from file_offset into the GPU tensor `dest`, through two
    pinned buffers so that a read and a host→GPU copy are always in flight together."""
    stream = torch.cuda.Stream(dest.device)
    staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]
    with open(path, "rb", buffering=0) as f, torch.cuda.stream(stream):
        f.seek(file_offset)
        pos, i = 0, 0
        while pos < dest.numel():
            buf = staging[i % 2]
            if done[i % 2] is not None:
                done[i % 2].synchronize()  # that buffer's previous copy has left it
            want = min(CHUNK, dest.numel() - pos)
            view = memoryview(buf.numpy())[:want]
            got = 0
            while got < want:
                n = f.readinto(view[got:])
                if not n:
                    raise EOFError(f"{path}: file ends at {file_offset + pos + got}, header says more")
                got += n
            dest[pos:pos + want].copy_(buf[:want], non_blocking=True)
            done[i % 2] = torch.cuda.Event()
            done[i % 2].record(stream)
            pos, i = pos + want, i + 1
    stream.synchronize()


def _read_range_to_host(path: Path, file_offset: int, dest: torch.Tensor) -> None:
    view = memoryview(dest.numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(file_offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise EOFError(f"{path}: file ends at {file_offset + got}, header says more")
            got += n


def load_file(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    data_start, header = read_header(path)
    total = max((info["data_offsets"][1] for info in header.values()), default=0)
    blob = torch.empty(total, dtype=torch.uint8, device=device)
    reader = _read_range if device.type == "cuda" else _read_range_to_host
    step = max(4096, -(-total // READERS))
    step += (-step) % 4096  # page-aligned ranges, one per reader
    with cf.ThreadPoolExecutor(READERS, thread_name_prefix="safetensors") as pool:
        futures = [pool.submit(reader, path, data_start + lo, blob[lo:lo + step]) for lo in range(0, total, step)]
        for future in futures:
            future.result()
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = blob[begin:end]
        if begin % 256:  # views must be aligned to their element size, and GEMM kernels like 256 B; rare, so copy
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(info["shape"])
    return tensors


def load_state_dict(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:  # each file already uses several readers; files one after another bound memory
        state.update(load_file(path, device))
    return state


def build_model(cls, folder: Path, device: torch.device, dtype: torch.dtype):
    """`cls` (a diffusers ModelMixin or a transformers PreTrainedModel) from `folder`'s config and
    weights, parameters on `device` in `dtype` (modules the class keeps in fp32 excepted), eval mode."""
    from accelerate import init_empty_weights

    with cf.ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
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
                if tensor.is_floating_point() and tensor.dtype != dtype and not keep_fp32 & set(name.split(".")):
                    state[name] = tensor.to(dtype)
            _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # Tied or derived weights may be absent from the file (the model re-creates them); anything else is an error.
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing {still_meta[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    model.to(device)  # buffers (made on the CPU, e.g. fp32 RoPE frequencies) follow, in their own dtype
    model.eval().requires_grad_(False)
    return model
