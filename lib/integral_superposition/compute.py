"""Where and in what precision the library computes: :func:`resolve_device`, :func:`resolve_dtype`.

Every step that computes (the model, the SAE encode, training, analysis, merge, steering)
takes its device and compute dtype from here, so that ``"auto"`` means the same everywhere:

- device ``auto``: the first CUDA device when there is one, else the CPU;
- dtype ``auto``: bf16 on a GPU that supports it, fp16 on an older GPU; bf16 on a CPU only
  when torch has native kernels for it (AVX512-BF16 or AMX on x86), float32 otherwise.

On a CPU without native bf16 torch runs bf16 matmuls through a slow fallback (one
``[2048, 640] @ [640, 2048]`` product took 8 s in bf16 against 0.07 s in float32 under AVX2),
so ``auto`` picks float32 there and an explicit bf16 logs a warning with the measured
slowdown. ``ISUP_CPU_BF16=1`` (or ``0``) overrides the CPU detection. Storage dtypes (of
activation shards, of saved SAEs) are not decided here: only compute changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "DTYPE_NAMES",
    "ComputeChoice",
    "available_memory",
    "check_memory",
    "cpu_bf16_support",
    "dtype_name",
    "parse_dtype",
    "resolve_compute",
    "resolve_device",
    "resolve_dtype",
    "short_name",
]

log = logging.getLogger(__name__)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
"""Accepted dtype names (besides ``"auto"`` and ``torch.dtype`` objects)."""

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CPU_BF16_ENV = "ISUP_CPU_BF16"
"""Environment variable that overrides the CPU bf16 detection: ``1`` native, ``0`` not."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None, arg: str = "dtype") -> torch.dtype | None:
    """A dtype name or ``torch.dtype`` -> ``torch.dtype``; ``None``/``"auto"`` -> None.

    Raises ``ValueError`` naming ``arg`` for anything else.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _SHORT:
            raise ValueError(
                f"{arg}={dtype}: expected torch.float32, torch.bfloat16 or torch.float16"
            )
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise ValueError(
            f"{arg}={dtype!r}: expected 'auto', 'fp32'/'float32', 'bf16'/'bfloat16' or "
            "'fp16'/'float16' (or a torch.dtype)"
        )
    return DTYPE_NAMES[key]


def resolve_device(
    device: str | torch.device | None = "auto", default: torch.device | None = None
) -> torch.device:
    """``"auto"``/None -> ``default`` when given, else ``cuda`` when available, else ``cpu``;
    ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device`` as they are.

    Raises ``ValueError`` for an unknown name or a CUDA device this machine does not have.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if default is not None:
            return torch.device(default)
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


# -- the CPU bf16 rule ----------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=4)
def _matmul_slowdown(dtype: torch.dtype = torch.bfloat16) -> float:
    """How many times slower a ``[128, 128] @ [128, 128]`` product runs in ``dtype`` than in
    float32 on this CPU (a probe of a few milliseconds; about 0.1 s where ``dtype`` is slow)."""
    a = torch.randn(128, 128)
    times = {}
    for dt in (torch.float32, dtype):
        x = a.to(dt)
        x @ x  # warm-up: the first call picks kernels
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    return times[dtype] / max(times[torch.float32], 1e-9)


def _onednn_bf16() -> bool | None:
    """oneDNN's own bf16 check (False under ``ONEDNN_MAX_CPU_ISA=AVX2``); None when unknown."""
    with contextlib.suppress(Exception):  # a private op, absent from some builds
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return None


@lru_cache(maxsize=1)
def _detect_cpu_bf16() -> tuple[bool, str]:
    cap = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if flags & {"avx", "avx2", "sse4_2"}:  # x86: the flags and torch's ISA level decide
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        mkldnn = _onednn_bf16()
        if native and (cap in ("DEFAULT", "NO AVX", "AVX2") or mkldnn is False):
            return False, (
                f"this CPU has no native bf16 in torch (it has {', '.join(native)}, but torch "
                f"runs at CPU capability {cap})"
            )
        if native:
            return True, f"this CPU has native bf16 ({', '.join(native)})"
        return False, f"this CPU has no native bf16 (CPU capability {cap}, no AVX512-BF16 or AMX)"
    slow = _matmul_slowdown()
    if slow < 1.5:
        return True, f"a bf16 matmul probe ran at {slow:.1f}x the float32 time"
    return False, f"this CPU has no native bf16 (a bf16 matmul probe ran {slow:.0f}x slower)"


def cpu_bf16_support() -> tuple[bool, str]:
    """``(native, reason)``: whether torch has native bf16 kernels on this CPU, and why.

    ``ISUP_CPU_BF16=1|0`` overrides the detection (the flags of ``/proc/cpuinfo``, torch's
    CPU capability and oneDNN's bf16 check, or a short timed matmul probe elsewhere).
    """
    env = os.environ.get(CPU_BF16_ENV, "").strip()
    if env in ("1", "0"):
        return env == "1", f"{CPU_BF16_ENV}={env}"
    if env:
        raise ValueError(f"{CPU_BF16_ENV}={env!r}: expected 1 (native bf16), 0 (none) or unset")
    return _detect_cpu_bf16()


@dataclass(frozen=True)
class ComputeChoice:
    """A resolved device and dtype, with the reason for the dtype."""

    device: torch.device
    dtype: torch.dtype
    reason: str
    """Why this dtype, e.g. ``"this CPU has no native bf16 (torch CPU capability AVX2)"``."""
    requested: str
    """The dtype that was asked for (``"auto"``, ``"bf16"``...)."""

    def describe(self) -> str:
        """``"cpu, float32 (auto: this CPU has no native bf16 ...)"``."""
        how = f"{self.requested}: {self.reason}" if self.reason else self.requested
        return f"{self.device}, {dtype_name(self.dtype)} ({how})"


def _gpu_choice(dev: torch.device) -> tuple[torch.dtype, str]:
    name = torch.cuda.get_device_name(dev)
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no including_emulation
        bf16 = torch.cuda.is_bf16_supported()
    if bf16:
        return torch.bfloat16, f"{name} supports bf16"
    return torch.float16, f"{name} has no bf16 (compute capability below 8.0)"


_LOGGED: set[tuple[str, str, str]] = set()
_LOG_LOCK = threading.Lock()


def _log_once(level: int, device: torch.device, requested: str, msg: str) -> None:
    key = (str(device), requested, msg)
    with _LOG_LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    log.log(level, msg)


def resolve_compute(
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    arg: str = "dtype",
    fp16: bool = True,
) -> ComputeChoice:
    """The device and compute dtype to use, with the reason (see the module docstring).

    ``dtype="auto"`` (or None) picks by hardware and logs the choice once; an explicit bf16
    (or fp16) on a CPU without native kernels is honoured with a warning that says how much
    slower it will run. ``fp16=False`` (a computation whose values can exceed fp16's range,
    such as SAE pre-activations) refuses an explicit fp16 and makes ``auto`` pick float32
    where it would pick fp16.
    """
    dev = resolve_device(device)
    requested = "auto" if dtype is None or str(dtype).lower() == "auto" else str(dtype)
    explicit = parse_dtype(dtype, arg)
    if explicit == torch.float16 and not fp16:
        raise ValueError(f"{arg}={dtype!r}: expected 'auto', 'float32' or 'bfloat16'")
    if dev.type == "cuda":
        if explicit is not None:
            return ComputeChoice(dev, explicit, "", requested)
        dt, why = _gpu_choice(dev)
        if dt == torch.float16 and not fp16:
            dt, why = torch.float32, f"{why}; fp16 is not used for {arg}"
        _log_once(logging.INFO, dev, requested, f"dtype auto -> {dtype_name(dt)}: {why}")
        return ComputeChoice(dev, dt, why, requested)
    if dev.type != "cpu":
        if explicit is not None:
            return ComputeChoice(dev, explicit, "", requested)
        why = f"float32 is the safe default on {dev.type}"
        return ComputeChoice(dev, torch.float32, why, requested)
    native, why = cpu_bf16_support()
    if explicit is None:
        dt = torch.bfloat16 if native else torch.float32
        _log_once(logging.INFO, dev, requested, f"dtype auto -> {dtype_name(dt)}: {why}")
        return ComputeChoice(dev, dt, why, requested)
    slow_half = (explicit == torch.bfloat16 and not native) or (
        explicit == torch.float16 and not (_cpu_flags() & {"avx512_fp16", "amx_fp16"})
    )
    if slow_half:
        probe = f"about {_matmul_slowdown(explicit):.0f}x slower than float32 in a matmul probe"
        _log_once(
            logging.WARNING,
            dev,
            requested,
            f"{arg}={requested!r} on this CPU runs {probe}: {why}; use 'auto' or 'fp32'",
        )
        return ComputeChoice(dev, explicit, f"slow on this CPU ({probe})", requested)
    return ComputeChoice(dev, explicit, "", requested)


def resolve_dtype(
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    arg: str = "dtype",
    fp16: bool = True,
) -> torch.dtype:
    """``"auto"``/``"fp32"``/``"bf16"``/``"fp16"`` (long names and ``torch.dtype`` too) on
    ``device`` -> the ``torch.dtype`` to compute in. See :func:`resolve_compute`."""
    return resolve_compute(dtype, device, arg, fp16).dtype


def short_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the config spelling)."""
    return _SHORT[dtype]


# -- memory --------------------------------------------------------------------------------
def available_memory(device: str | torch.device | None = "cpu") -> int | None:
    """Bytes that new tensors can take on ``device``: the RAM the OS reports as available
    (psutil) on the CPU, the free memory on a CUDA device; ``None`` when unknown (MPS)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.2f} GiB"


def check_memory(nbytes: float, device: str | torch.device | None, what: str) -> None:
    """``MemoryError`` naming ``what`` when ``nbytes`` exceed the memory available on
    ``device`` (:func:`available_memory`); checked before allocating, not after failing."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        raise MemoryError(
            f"{what}: needs at least {_gib(nbytes)} on {dev}, but only {_gib(free)} is available"
        )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` with another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS.

    glibc serves blocks below its mmap threshold from the heap, and the threshold grows to the
    largest block freed so far (up to 32 MiB), so a CPU pass's chunk-sized temporaries and
    selection pools end up there. Their freed pages stay resident, more of them the more chunks
    a pass runs. Trimming once per chunk (about 2 ms) keeps the peak flat in the token count.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
