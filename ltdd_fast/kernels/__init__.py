"""Triton kernels of ltdd_fast, one file per operator: the kernels and a launcher that checks its inputs.

May import torch and Triton only. ltdd_fast.ops defines each operator ltdd_triton::NAME around its launcher (with
the fake and autograd formula it shares with the native twin) and imports these modules on first use: Triton is
optional and slow to import. The public entry points are the functions of ltdd_fast.ops with backend="triton".

Without a GPU, Triton runs its kernels only in its interpreter, on CPU tensors, which it picks when the kernels
are defined: so on a machine where torch sees no CUDA device this package sets TRITON_INTERPRET=1 before
importing Triton (unless the variable is already set). Under the interpreter there is no bf16 arithmetic and
speed means nothing; results are checked against the reference all the same.

Why custom_op and not torch.library.triton_op: under the interpreter (torch 2.13) triton_op's generated fake
kernel fails opcheck's fake-tensor test, and these ops must be testable here. As custom ops they run in eager
mode, under autograd and under torch.compile (as opaque calls).
"""
import os

import torch

if not torch.cuda.is_available():  # also done by ltdd_fast/__init__.py, before torch can import Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    IMPORT_ERROR = None
    # Triton fixed its mode when first imported: if that happened before TRITON_INTERPRET was set, its own
    # library functions are compiled-mode and the interpreter cannot run our kernels
    if INTERPRET and type(tl.zeros).__name__ != "InterpretedFunction":
        IMPORT_ERROR = RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; set it in the "
                                    "environment (or import ltdd_fast before anything imports Triton)")
except ImportError as exc:  # Triton is optional: ltdd_fast.ops reports this when backend="triton" is asked for
    IMPORT_ERROR = exc

AVAILABLE = IMPORT_ERROR is None


def supports(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device` in this process."""
    if not AVAILABLE:
        return False
    return device.type == "cpu" if INTERPRET else device.type == "cuda"


def acc_dtype(dtype: torch.dtype):
    """The accumulation type of the kernels for inputs of `dtype`: fp64 for fp64, fp32 otherwise (fp16, bf16,
    fp32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()

