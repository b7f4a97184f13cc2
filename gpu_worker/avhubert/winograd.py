"""Winograd convolution F(m x m, 3 x 3) for the ResNet's small feature maps, CPU fp32.

A 3x3 convolution computes each output from 9 products per input channel; Winograd's minimal filtering
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes an ``m x m`` output
tile from an ``(m+2) x (m+2)`` input tile with ``(m+2)^2`` products: the input tile and the kernel go
to a transformed domain (``B^T d B``, ``G g G^T``), multiply element by element, and come back
(``A^T [.] A``). Over the channels the element-wise products are ``(m+2)^2`` independent GEMMs.

With ``m = 3`` the ResNet's layer 4 (512 channels on 3x3 maps) is one tile a frame: 25 products where
the direct convolution has 49 (the taps that do not meet padding), and layer 3 (256 channels, 6x6) is
four tiles: 100 against 256. The transforms use the points 0, 1, -1, 2 (and infinity); in fp32 the
result differs from the direct convolution by rounding only (about 1e-6 relative; a test bounds it).

The transforms run as small matrix products over every tile and channel at once, the GEMMs as oneDNN
inner products on weights transformed and packed once (:class:`.packed.PackedLinear`): the same numbers at any
thread count (a test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packed import PackedLinear

POINTS = {2: (0.0, 1.0, -1.0), 3: (0.0, 1.0, -1.0, 2.0), 4: (0.0, 1.0, -1.0, 2.0, -2.0)}


def winograd_matrices(m: int, r: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """``(A^T [m, n], G [n, r], B^T [n, n])`` in float64 for F(m, r), ``n = m + r - 1``, from the points
    :data:`POINTS` and infinity (Toom-Cook): ``y = A^T ((G g) * (B^T d))`` is the correlation of ``d``
    (``n`` inputs) with ``g`` (``r`` taps). ``A^T`` and ``G`` are the Vandermonde evaluation at the
    points; ``B^T`` is solved from the identity it must satisfy (exact up to float64 rounding)."""
    n = m + r - 1
    points = torch.tensor(POINTS[m], dtype=torch.float64)
    a_t = torch.zeros(m, n, dtype=torch.float64)
    g = torch.zeros(n, r, dtype=torch.float64)
    for j, p in enumerate(points):
        a_t[:, j] = p ** torch.arange(m)
        g[j] = p ** torch.arange(r) / torch.prod(torch.stack([p - q for k, q in enumerate(points) if k != j]))
    a_t[m - 1, n - 1] = g[n - 1, r - 1] = 1.0  # the point at infinity
    # sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k] for every output i, tap k and input l
    system = torch.stack([a_t[i] * g[:, k] for i in range(m) for k in range(r)])  # [m*r, n]
    target = torch.zeros(m * r, n, dtype=torch.float64)
    for i in range(m):
        for k in range(r):
            target[i * r + k, i + k] = 1.0
    b_t = torch.linalg.lstsq(system, target).solution
    if (system @ b_t - target).abs().max() > 1e-12:
        raise ArithmeticError(f"no Winograd F({m}, {r}) transform for the points {POINTS[m]}")
    return a_t, g, b_t


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 convolution zero-padded by 1 (+ bias) as Winograd F(m x m, 3 x 3).

    ``[N, C, H, W]`` (best channels-last) -> ``[N, C_out, H, W]`` channels-last.
    """

    bias: Tensor
    input_transform: Tensor
    output_transform: Tensor

    def __init__(self, conv: nn.Conv2d, m: int = 3) -> None:
        super().__init__()
        cout, cin, kh, kw = conv.weight.shape
        if ((kh, kw) != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1
                or conv.dilation != (1, 1) or conv.padding_mode != "zeros"):
            raise ValueError("WinogradConv2d takes a 3x3 convolution of stride 1, zero-padded by 1")
        a_t, g, b_t = winograd_matrices(m)
        self.m, self.n = m, m + 2
        self.in_channels, self.out_channels = cin, cout
        weight = torch.einsum("ak,oikl,bl->abio", g, conv.weight.detach().double(), g)  # [n, n, C, C_out]
        # product k's [C_out, C] weight
        self.products = nn.ModuleList(PackedLinear(product.t().float(), None) for product in weight.flatten(0, 1))
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(cout)
        self.register_buffer("bias", bias.float().contiguous())
        # both axes at once: V[(p, q)] = sum_(i, j) B^T[p, i] B^T[q, j] d[(i, j)], and the same with A^T
        self.register_buffer("input_transform", torch.kron(b_t, b_t).float())  # [n*n, n*n]
        self.register_buffer("output_transform", torch.kron(a_t, a_t).float())  # [m*m, n*n]

    def forward(self, x: Tensor) -> Tensor:
        n_frames, c, h, w = x.shape
        m, n = self.m, self.n
        th, tw = -(-h // m), -(-w // m)
        # channels-last [N, H, W, C], padded by 1 before and up to whole tiles after
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * m + 1 - w, 1, th * m + 1 - h))
        tiles = padded.unfold(1, n, m).unfold(2, n, m)  # [N, th, tw, C, n, n] (a view)
        rows = n_frames * th * tw
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(n * n, rows * c)  # [(i, j), (tile, C)]
        v = torch.mm(self.input_transform, d).view(n * n, rows, c)
        products = torch.stack([product(v[k]) for k, product in enumerate(self.products)])  # [(p, q), tile, C_out]
        y = torch.mm(self.output_transform, products.view(n * n, rows * self.out_channels))
        y = y.view(m, m, n_frames, th, tw, self.out_channels).permute(2, 3, 0, 4, 1, 5)  # [N, th, r, tw, s, C_out]
        out = x.new_empty(n_frames, h, w, self.out_channels)
        if h == th * m and w == tw * m:  # whole tiles: the bias is added on the way into place
            torch.add(y, self.bias, out=out.view(n_frames, th, m, tw, m, self.out_channels))
        else:
            torch.add(y.reshape(n_frames, th * m, tw * m, self.out_channels)[:, :h, :w], self.bias, out=out)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F({self.m}x{self.m}, 3x3)"
