"""Backend registry and selection.

Four backends implement every op behind one public function:

- ``reference``: eager PyTorch inside the package; any device; the ground truth.
- ``cpu``: C++ kernels of the compiled extension ``red_kernels._C``; CPU tensors.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``.
- ``cuda``: CUDA kernels of the compiled extension; CUDA tensors.

Selection, first match wins: the op's ``backend=`` argument, the innermost :func:`use_backend`
context, the ``RED_KERNELS_BACKEND`` environment variable, then automatic. An explicit choice that
cannot run the input raises ``RuntimeError`` with the reason; the automatic choice falls back
quietly (cuda, triton, reference on GPU; cpu, reference on CPU). Nothing here initialises CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO = "auto"
ENV_VAR = "RED_KERNELS_BACKEND"

# Automatic preference per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

# The innermost use_backend() selection of each thread (attribute ``selected``). Per thread, not a
# module-level stack, so that threads never see each other's selection; each block restores what it
# replaced. threading.local rather than a ContextVar because torch.compile traces (and guards on)
# an attribute read of it, while ContextVar.get is a graph break.
_local = threading.local()


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`backends` reports for one backend."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        devices = ", ".join(self.devices) if self.devices else "-"
        return f"{self.name:<10} {state:<12} devices: {devices:<10} {self.reason}"


_ext_hooks: list[Callable[[], None]] = []
_ext_loaded = False


def when_extension_loads(hook: Callable[[], None]) -> None:
    """Run ``hook`` once ``red_kernels._C`` is loaded: now if it already is, else right after it
    loads. The ops modules register the fake impls of their C++ ops this way (a fake impl can only
    be attached to an op that exists, and loading the extension stays lazy)."""
    if _ext_loaded:
        hook()
    else:
        _ext_hooks.append(hook)


@functools.cache
def extension_status() -> tuple[bool, str]:
    """Load ``red_kernels._C`` once; return (loaded, reason)."""
    global _ext_loaded
    if os.environ.get("RED_KERNELS_DISABLE_EXT", "0") == "1":
        return False, "disabled by RED_KERNELS_DISABLE_EXT=1"
    try:
        from red_kernels import _C  # noqa: F401  (loading registers torch.ops.red_kernels_C)
    except ImportError as exc:
        return False, (
            f"compiled extension red_kernels._C not built ({exc}); build with `pip install --no-build-isolation -e .`"
        )
    _ext_loaded = True
    while _ext_hooks:
        _ext_hooks.pop(0)()
    return True, f"compiled extension red_kernels._C ({_cpu_isa_note()})"


def _cpu_isa_note() -> str:
    """Which build of the CPU row kernels runs (csrc/common/cpu_isa.h; RED_KERNELS_CPU_ISA)."""
    from red_kernels import _C

    try:
        return f"CPU kernels: {_C.cpu_isa()}"
    except (AttributeError, RuntimeError) as exc:  # an older build; a bad RED_KERNELS_CPU_ISA
        return f"CPU kernels: {str(exc).splitlines()[0]}"


# Cached: neither answer changes once the extension is loaded, and the eager path of every op asks
# (uncached, ~4 us per call on a CUDA build, more than the C++ op's own call overhead).
@functools.cache
def _ext_has_cuda() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("red_kernels_C::red_edit", "CUDA")


@functools.cache
def _cuda_available() -> bool:
    # torch.cuda.is_available() queries the driver without creating a context.
    return torch.cuda.is_available()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed (pip install triton): {exc}"
    except Exception as exc:  # a broken triton install must not break red_kernels
        return False, f"import triton failed: {exc}"
    return True, ""


def backend_info(name: str) -> BackendInfo:
    """Availability of one backend, with the reason."""
    if name == "reference":
        return BackendInfo(name, True, ("cpu", "cuda"), "eager PyTorch, always available")
    if name == "cpu":
        ok, why = extension_status()
        return BackendInfo(name, ok, ("cpu",) if ok else (), why)
    if name == "cuda":
        ok, why = extension_status()
        if not ok:
            return BackendInfo(name, False, (), why)
        if not _ext_has_cuda():
            return BackendInfo(
                name,
                False,
                (),
                "extension built without CUDA kernels (needs a CUDA build of torch and nvcc at build time)",
            )
        if not _cuda_available():
            return BackendInfo(name, False, (), "CUDA kernels built, but no CUDA device is visible")
        return BackendInfo(name, True, ("cuda",), "CUDA kernels of red_kernels._C")
    if name == "triton":
        ok, why = _triton_import_status()
        if not ok:
            return BackendInfo(name, False, (), why)
        if triton_interpreting():
            return BackendInfo(name, True, ("cpu",), "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors")
        if _cuda_available():
            return BackendInfo(name, True, ("cuda",), "Triton kernels on CUDA")
        return BackendInfo(name, False, (), "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> list[BackendInfo]:
    """Every backend, available or not, and why."""
    return [backend_info(name) for name in BACKENDS]


def _check_name(name: str, source: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {(AUTO, *BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``"auto"`` restores automatic choice).

    The selection is per thread: other threads keep their own, and a new thread starts with none."""
    name = _check_name(name, "use_backend")
    previous = getattr(_local, "selected", None)
    _local.selected = name
    try:
        yield
    finally:
        _local.selected = previous


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for: argument, then context, then environment, else ``"auto"``."""
    if explicit is not None:
        return _check_name(explicit, "backend argument")
    selected = getattr(_local, "selected", None)
    if selected is not None:
        return selected
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return AUTO


def resolve(requested: str, device: torch.device, op: str, implemented: tuple[str, ...]) -> str:
    """The backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends that have an implementation of ``op``. An explicit request
    that cannot run raises ``RuntimeError`` naming the reason; ``"auto"`` takes the first backend
    in the device's preference order that can.
    """
    dev = device.type
    if requested == AUTO:
        for name in _AUTO_ORDER.get(dev, ("reference",)):
            if name in implemented:
                info = backend_info(name)
                if info.available and dev in info.devices:
                    return name
        return "reference"
    if requested not in implemented:
        raise RuntimeError(f"red_kernels.{op}: backend {requested!r} has no implementation of this op")
    info = backend_info(requested)
    if not info.available:
        raise RuntimeError(f"red_kernels.{op}: backend {requested!r} is unavailable: {info.reason}")
    if dev not in info.devices:
        raise RuntimeError(
            f"red_kernels.{op}: backend {requested!r} runs on {', '.join(info.devices)} tensors, not on {device}"
        )
    return requested
