"""Which backend runs an operator, and the one place where an operator is registered with torch.library.

Backends: "native" (ltdd_fast._C: schemas in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda), "triton"
(ltdd_fast.kernels, imported on first use), "reference" (each operator module's plain PyTorch function) and
"auto": the native op for CPU tensors; for CUDA tensors the backend that CUDA_BACKENDS names for that op (native
where the op has a CUDA kernel, as measured fastest on an H100; Triton for norm_relu_pool).

register() takes an Operator (its schema, reference, fake and autograd formula) and registers the fake and the
formula once for each twin: the native op ltdd_fast::NAME and the Triton op ltdd_triton::NAME, which it defines
here with the same schema around the Triton launcher. One formula serves both twins, so they compose with
autograd and torch.compile alike.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

try:
    from .. import _C  # noqa: F401 - loading the library defines torch.ops.ltdd_fast.*
    NATIVE_AVAILABLE = True
except ImportError as exc:  # a broken build must not break the package: the reference path still works
    NATIVE_AVAILABLE = False
    warnings.warn(f"ltdd_fast: native operators unavailable ({exc}); using the PyTorch reference")

BACKENDS = ("auto", "native", "triton", "reference")
NAMESPACES = {"native": "ltdd_fast", "triton": "ltdd_triton"}


@dataclass(frozen=True)
class Operator:
    """One fused operator: everything torch.library and the tests need to know of it.

    schema: the signature both twins share (without the namespace); the native one is defined in csrc/ops.cpp
    and must match. reference: the plain PyTorch function the twins are tested against. fake: the fake
    (meta) kernel. autograd: op -> (backward, setup_context) for the twin `op`, or None when the operator is not
    differentiated. triton: the Python function that runs the Triton kernel (it imports ltdd_fast.kernels), or
    None. native: whether csrc has the op. mutates: the arguments it writes. internal: a helper of another
    operator (a Triton backward), not offered to callers."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    autograd: Optional[Callable] = None
    triton: Optional[Callable] = None
    native: bool = True
    mutates: tuple = ()
    internal: bool = False


OPERATORS: dict[str, Operator] = {}


def register(op: Operator) -> Operator:
    """Define the Triton twin and register op's fake and autograd formula on both twins, once."""
    if op.name in OPERATORS:
        raise RuntimeError(f"operator {op.name} is registered twice")
    if op.native and NATIVE_AVAILABLE:
        qualname = f"ltdd_fast::{op.name}"
        native_schema = str(getattr(torch.ops.ltdd_fast, op.name).default._schema)
        if native_schema != qualname + op.schema[len(op.name):]:
            raise RuntimeError(f"{qualname}: csrc/ops.cpp defines {native_schema}, the Python side {op.schema}")
        torch.library.register_fake(qualname, op.fake)
        if op.autograd is not None:
            backward, setup = op.autograd(getattr(torch.ops.ltdd_fast, op.name))
            torch.library.register_autograd(qualname, backward, setup_context=setup)
    if op.triton is not None:
        qualname = f"ltdd_triton::{op.name}"
        defined = torch.library.custom_op(qualname, op.triton, mutates_args=op.mutates,
                                          schema=op.schema[len(op.name):])
        defined.register_fake(op.fake)
        if op.autograd is not None:
            backward, setup = op.autograd(getattr(torch.ops.ltdd_triton, op.name))
            defined.register_autograd(backward, setup_context=setup)
    OPERATORS[op.name] = op
    return op


def public() -> tuple[str, ...]:
    """The operators offered to callers, in registration order."""
    return tuple(name for name, op in OPERATORS.items() if not op.internal)


def has(backend: str) -> tuple[str, ...]:
    """The public operators that have a `backend` ("native" or "triton") twin."""
    twin = {"native": lambda op: op.native, "triton": lambda op: op.triton is not None}[backend]
    return tuple(name for name in public() if twin(OPERATORS[name]))


def cuda_backends_from_env(text):
    """The CUDA backend of each public operator with LTDD_CUDA_BACKENDS="op=backend,op=backend" applied: native
    where the op has a native twin, else Triton."""
    chosen = {name: "native" if OPERATORS[name].native else "triton" for name in public()}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, backend = item.partition("=")
        if name not in chosen or backend not in ("native", "triton"):
            raise ValueError(f"LTDD_CUDA_BACKENDS entry {item!r}: expected op=native|triton with op one of "
                             f"{tuple(chosen)}")
        chosen[name] = backend
    return chosen


# Which fast backend "auto" picks for CUDA tensors, per operator: the native CUDA kernel wherever there is one.
# On an H100 (bench/results/h100-80gb-hbm3-ops-{native,triton}-2026-11-22.json) it was faster than the Triton twin
# at every size, 1.0x (SGD step at 11M parameters, both at the copy bandwidth) to 6.6x (class_grad_stats); the
# Triton launches cost 60-150 us of host time each against the native ops' 15-35 us. Set per op with
# set_cuda_backend() or the environment variable LTDD_CUDA_BACKENDS="param_distance=triton,...". Filled by
# ltdd_fast.ops once every operator is registered (cuda_backends_from_env(os.environ...)).
CUDA_BACKENDS: dict[str, str] = {}


def set_cuda_backend(op_name, backend):
    """Make backend="auto" run `op_name` on CUDA tensors with `backend` ("native" or "triton")."""
    if op_name not in CUDA_BACKENDS or backend not in ("native", "triton"):
        raise ValueError(f"expected an op of {tuple(CUDA_BACKENDS)} and a backend 'native' or 'triton', "
                         f"got {op_name!r}, {backend!r}")
    CUDA_BACKENDS[op_name] = backend


# (op, device type) pairs found to have a native kernel. The dispatcher lookup costs a few microseconds per call,
# a sizeable part of a small op (a 0.3M-parameter student step takes ~50 us); kernels, once registered, stay.
_NATIVE_KERNELS = set()


@torch.compiler.assume_constant_result  # traced code (torch.compile) takes the answer as a constant
def native_supports(op_name, device):
    if not NATIVE_AVAILABLE or not OPERATORS[op_name].native:
        return False
    if (op_name, device.type) in _NATIVE_KERNELS:
        return True
    found = torch._C._dispatch_has_kernel_for_dispatch_key(f"ltdd_fast::{op_name}", device.type.upper())
    if found:
        _NATIVE_KERNELS.add((op_name, device.type))
    return found


@torch.compiler.assume_constant_result
def triton_problem(op_name, device):
    """Why the Triton kernel of op_name cannot run on device (None when it can). Imports Triton."""
    if OPERATORS[op_name].triton is None:
        return f"ltdd_fast has no Triton kernel for {op_name}"
    from .. import kernels  # Triton is optional and slow to import: only when a Triton kernel is asked for
    if not kernels.AVAILABLE:
        return f"Triton is not installed ({kernels.IMPORT_ERROR}): pip install triton"
    if not kernels.supports(device):
        if kernels.INTERPRET:
            return (f"Triton runs in its interpreter (TRITON_INTERPRET=1) in this process, on CPU tensors only; "
                    f"got {device.type} tensors")
        return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only under its interpreter: "
                f"set TRITON_INTERPRET=1 before ltdd_fast.kernels is imported")
    return None


def backend_problem(backend, device):
    """Why `backend` cannot run its operators on `device` in this process (None when it can): a check for
    callers that want to fail before any work, e.g. the Distiller."""
    device = torch.device(device)
    if backend == "triton":
        return triton_problem("param_distance", device)
    if backend == "native" and not native_supports("param_distance", device):
        return f"this build has no native kernels for {device.type} tensors"
    return None


def pick(backend, op_name, device):
    """"native", "triton" or "reference" for this op on tensors of `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "native":
        if not native_supports(op_name, device):
            raise RuntimeError(f"ltdd_fast::{op_name} has no native kernel for {device.type} tensors in this build")
        return "native"
    if backend == "triton":
        problem = triton_problem(op_name, device)
        if problem:
            raise RuntimeError(f"backend='triton' cannot run {op_name}: {problem}")
        return "triton"
    # auto
    if device.type == "cuda" and CUDA_BACKENDS.get(op_name) == "triton" and triton_problem(op_name, device) is None:
        return "triton"
    if native_supports(op_name, device):
        return "native"
    if device.type == "cuda" and triton_problem(op_name, device) is None:
        return "triton"
    return "reference"


def call_fast(which, op_name, *args):
    """The one way to call a fused kernel: torch.ops.ltdd_fast.<op_name> (which="native") or
    torch.ops.ltdd_triton.<op_name> (which="triton") on args, called below the autograd dispatch key when no
    gradient is needed: the
    autograd formula registered from Python is a Python kernel that costs ~4 us a call only to find that out and
    redispatch (a tenth of a 0.3M-parameter student step). The test is the one that kernel makes, under the same
    guard; traced code (torch.compile) and torch.func transforms take the ordinary path."""
    op = getattr(getattr(torch.ops, NAMESPACES[which]), op_name)
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def check_flat_vectors(first, *others, alpha):
    """The first (name, tensor) must be a flat floating-point vector and the others must match it; returns alpha
    as a one-element tensor of its dtype and device."""
    name0, ref = first
    if ref.dim() != 1:
        raise ValueError(f"{name0} must be a flat 1-D parameter vector, got shape {tuple(ref.shape)}")
    if not ref.is_floating_point():
        raise ValueError(f"{name0} must be floating point, got {ref.dtype}")
    for name, t in others:
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"{name} must match {name0} ({tuple(ref.shape)}, {ref.dtype}, {ref.device}), "
                             f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=ref.dtype, device=ref.device)
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one value, got shape {tuple(alpha.shape)}")
    return alpha


def check_classes(classes, rows, num_classes, device, what):
    """classes must be int64 [rows] on device with values in [0, num_classes) (checked on CPU tensors only)."""
    if not torch.is_tensor(classes) or classes.dtype != torch.int64 or classes.shape != (rows,):
        got = f"{classes.dtype} {tuple(classes.shape)}" if torch.is_tensor(classes) else type(classes).__name__
        raise ValueError(f"classes must be an int64 tensor of shape ({rows},) (one class per row of {what}), "
                         f"got {got}")
    if classes.device != device:
        raise ValueError(f"classes must be on {device}, got {classes.device}")
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    # a range check on an accelerator would synchronise every call; the kernels check on CPU anyway
    if classes.device.type == "cpu" and rows:
        lo, hi = (int(x) for x in torch.aminmax(classes))  # one pass for both bounds
        if not (0 <= lo and hi < num_classes):
            raise ValueError(f"classes must lie in [0, {num_classes}), got values in [{lo}, {hi}]")

