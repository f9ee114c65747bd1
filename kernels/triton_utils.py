"""Pieces the Triton kernels in ``kernels/`` share: the output buffers (every kernel), and for the chunked ones
(Lightning's and Gated DeltaNet's) the tensor-core product, its precision and the tile width."""

import torch
import triton
import triton.language as tl


def empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel's output buffers come from here, looked up as ``triton_utils.empty`` at each call, so that
    tests can poison them all (fill with NaN) in one place."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on the tensor cores, fp32 accumulation (acc may be None). PREC "interpret"
    upcasts the operands: the Triton interpreter multiplies bf16 wrongly (numpy has no bf16),
    and the upcast is exact."""
    if PREC == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


def dot_precision(x: torch.Tensor) -> str:
    """PREC for ``dot`` on operands like x."""
    if not x.is_cuda:
        return "interpret"
    # fp32 inputs: three tf32 products per dot give ~fp32 accuracy on tensor cores.
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def pow2(n: int) -> int:
    """A tile width covering n: tl.dot needs powers of two of at least 16."""
    return max(16, triton.next_power_of_2(n))
