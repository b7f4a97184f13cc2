"""Linear layers with their weights prepacked by oneDNN, for fp32 inference on CPU.

``F.linear`` on CPU calls MKL's sgemm, which re-reads the weight in its own order on every call.
For the few rows of a decoding step (beam x batch rows) that runs far below the memory bandwidth:
on a 2-core AMD EPYC, 5 rows against 24 weights of 3072x768 read 5-9 GB/s, where a plain sum of
the same weights reads 24 GB/s. oneDNN's inner-product primitive on a weight reordered once into
its blocked layout (what inductor's ``freezing`` does, here without a compiler) reads 12-19 GB/s,
and at the encoder's 250 rows it is about 1.5x faster as well. The results differ from
``F.linear`` by fp32 rounding only (a different summation order).

The packed weight is an opaque oneDNN tensor: a packed module cannot move to another device or
dtype, be saved or trained. Packing is the last step of preparing a CPU fp32 model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops :class:`PackedLinear` calls."""
    ops = torch.ops.mkldnn
    built = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # untyped in torch
    return bool(built) and all(hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` for ``x`` ``[..., in]`` -> ``[..., out]``, the fp32 CPU ``weight``
    ``[out, in]`` (any strides) reordered once by oneDNN."""

    packed: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"PackedLinear takes a CPU float32 weight, not {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> None:
    """Replace every ``nn.Linear`` inside ``module`` by a :class:`PackedLinear`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # not subclasses (quantised or other Linear kinds)
                setattr(parent, name, PackedLinear(child.weight, child.bias))
