"""Numeric precision of the forward (and backward) passes: detection, resolution, autocast.

The setting ``auto | float32 | bfloat16`` (config ``predict.precision`` and
``train.precision``, CLI ``--precision``) is resolved once per run to the
precision actually used, which outputs record:

* CPU: ``auto`` = bfloat16 autocast where the CPU computes bfloat16 natively
  (AMX-BF16 or AVX512-BF16, detected at run time by :func:`cpu_bf16_native`),
  else float32.  Without those instructions oneDNN emulates bfloat16 with
  float32 arithmetic plus conversions, slower than float32 itself.
* CUDA, prediction: ``auto`` = bfloat16 autocast where the GPU supports it,
  else float16.  CUDA, training: ``auto`` = float16 autocast with a gradient
  scaler (the loss-scaling keeps small fp16 gradients from flushing to zero);
  a forced ``bfloat16`` runs without a scaler (bfloat16 has float32's range).
* ``UNET_PIPE_CPU_BF16=0`` (environment) makes ``auto`` float32 on every CPU;
  ``=1`` treats the CPU as bfloat16-native.
* ``float32`` is float32 everywhere (on CUDA also without TF32 convolutions).

Autocast keeps softmax, the loss and the optimizer in float32; only the
convolutions (and matrix products) run in the reduced precision.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch

from unet_pipe.errors import ConfigError
from unet_pipe.machine import cpu_flags, cpu_model

#: What a user may ask for.
REQUESTS = ("auto", "float32", "bfloat16")
#: What a run may resolve to (float16 only on CUDA).
RESOLVED = ("float32", "bfloat16", "float16")
#: /proc/cpuinfo flags of the instructions that compute bfloat16 products natively.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


#: Environment variable that overrides the detection: ``0`` makes ``auto`` float32 on any
#: CPU (e.g. to reproduce float32 results of another machine, or to run the test suite
#: both ways on an AMX CPU), ``1`` claims native bfloat16 (slow where it is emulated).
CPU_BF16_ENV = "UNET_PIPE_CPU_BF16"


def cpu_bf16_native(flags: Iterable[str] | None = None) -> bool:
    """True if the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16).

    ``flags``: CPU feature flags (default: this machine's, :func:`unet_pipe.machine.cpu_flags`,
    unless :data:`CPU_BF16_ENV` is ``0`` or ``1``).  Where the OS lists no flags (not Linux),
    torch's own CPUID probe answers.
    """
    if flags is None:
        forced = os.environ.get(CPU_BF16_ENV, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        if forced:
            raise ConfigError(None, f"{CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
    flags = frozenset(cpu_flags() if flags is None else flags)
    if flags:
        return any(f in flags for f in BF16_FLAGS)
    probe = torch.cpu
    return bool(
        getattr(probe, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(probe, "_is_amx_tile_supported", lambda: False)()
    )


def check_request(precision: str, where: str = "precision") -> str:
    """``precision`` if it is one of :data:`REQUESTS` (or already resolved), else a ConfigError."""
    if precision not in REQUESTS and precision not in RESOLVED:
        raise ConfigError(None, f"{where} must be one of {', '.join(REQUESTS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: str | torch.device, *, training: bool = False) -> str:
    """The precision a run on ``device`` uses for the request ``precision`` (see the module doc)."""
    check_request(precision)
    kind = torch.device(device).type
    if precision != "auto":
        if precision == "float16" and kind != "cuda":
            raise ConfigError(None, "precision float16 is for CUDA only; use bfloat16 on the CPU")
        return precision
    if kind == "cuda":
        if training:
            return "float16"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_bf16_native() else "float32"


def autocast_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: plain float32)."""
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolved]


@contextlib.contextmanager
def autocast(device: str | torch.device, resolved: str) -> Iterator[None]:
    """Autocast to ``resolved`` on ``device``; float32 on CUDA also turns TF32 convolutions off."""
    kind = torch.device(device).type
    dtype = autocast_dtype(resolved)
    if dtype is None:
        if kind == "cuda":
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                yield
        else:
            yield
        return
    with torch.autocast(kind, dtype=dtype):
        yield


def precision_record(resolved: str) -> dict:
    """What outputs record about the precision: the one used, the CPU model and its bf16 flags."""
    return {
        "precision": resolved,
        "cpu_model": cpu_model(),
        "cpu_bf16_flags": sorted(f for f in BF16_FLAGS if f in cpu_flags()),
        "cpu_bf16_native": cpu_bf16_native(),
    }
