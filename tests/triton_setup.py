"""What every Triton test file needs: the kernels package (importing this skips the importing test module when
Triton cannot run here), the device the kernels run on (cuda on a GPU, else the CPU under Triton's interpreter)
and the dtypes tested there (bf16 on a GPU only: the interpreter has no bf16 arithmetic)."""
import pytest
import torch

kernels = pytest.importorskip("ltdd_fast.kernels")
if not kernels.AVAILABLE:
    pytest.skip(f"Triton unavailable: {kernels.IMPORT_ERROR}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
