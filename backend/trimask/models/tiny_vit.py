"""MobileSAM's image encoder (``vit_t``): TinyViT-5M at 1024 px with a neck to 256 x 64 x 64.

Layout: a conv stem (two stride-2 3x3 conv+BN, 1024 -> 256 px), one stage of MBConv blocks, then
three stages of windowed attention blocks (attention with learned per-offset biases, a depthwise
"local" conv, an MLP), patch-merging convs between stages (the last one keeps the resolution, so
the output grid is 64 x 64), and SAM's conv neck. The classification head (``norm_head``,
``head``) is unused but kept: the official ``mobile_sam.pt`` holds its weights and loads strictly.
Module and parameter names follow that checkpoint.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trimask.models.common import sam_neck
from trimask.models.image_encoder import window_partition, window_unpartition


class ConvBN(nn.Sequential):
    """Conv2d without bias (``c``) followed by BatchNorm2d (``bn``): B x a x H x W -> B x b x H' x W'."""

    def __init__(
        self, a: int, b: int, *, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Conv stem: B x 3 x H x W -> B x embed_dim x H/4 x W/4."""

    def __init__(self, *, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, ks=3, stride=2, pad=1),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, ks=3, stride=2, pad=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. B x C x H x W."""

    def __init__(self, *, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, ks=3, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Between stages: 1x1 conv, 3x3 depthwise conv (stride 2, or 1 to keep the grid), 1x1 conv.

    Input B x C x H x W or tokens B x HW x C (on input_resolution); output tokens B x H'W' x out_dim.
    """

    def __init__(self, *, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, ks=3, stride=stride, pad=1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x).flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """The first stage: MBConv blocks on B x C x H x W, then patch merging to tokens."""

    def __init__(self, *, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim=dim, expand_ratio=expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    """Pre-norm MLP on tokens: B x N x C -> B x N x C."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def attention_bias_index(resolution: tuple[int, int]) -> Tensor:
    """N x N index into the per-offset bias table, N = h*w.

    The table is ordered by first appearance of each (|dy|, |dx|) scanning point pairs in
    row-major order; every offset already appears with the first point (0, 0), so the index of
    offset (dy, dx) is dy * w + dx.
    """
    h, w = resolution
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :]).abs() * w + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Pre-norm multi-head attention in a window with a learned bias per relative offset.

    qkv is laid out per head as [q | k | v]. Tokens: B x N x C -> B x N x C (N = window area).
    """

    def __init__(self, *, dim: int, key_dim: int, num_heads: int, attn_ratio: float = 1.0,
                 resolution: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        index = attention_bias_index(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        # Derived from the resolution, not trained: not saved (as in the official checkpoint).
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
        # Indexed on every call (cheap) so the bias always reflects the loaded parameters.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # heads x N x N
        # An expanded (not broadcast) mask takes SDPA's fast CPU path; expand copies nothing.
        bias = bias.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows), depthwise local conv, MLP. B x HW x C."""

    def __init__(self, *, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(dim=dim, key_dim=head_dim, num_heads=num_heads, attn_ratio=1.0,
                              resolution=(window_size, window_size))
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, ks=local_conv_size, pad=local_conv_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            attended = self.attn(x)
        else:
            windows, pad_hw = window_partition(x.view(b, h, w, c), ws)
            windows = self.attn(windows.reshape(-1, ws * ws, c)).view(-1, ws, ws, c)
            attended = window_unpartition(windows, ws, pad_hw, (h, w)).reshape(b, n, c)
        x = x + attended
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks on tokens, then optional patch merging."""

    def __init__(self, *, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float, local_conv_size: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                         window_size=window_size, mlp_ratio=mlp_ratio, local_conv_size=local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """MobileSAM's encoder: B x 3 x 1024 x 1024 (normalized, padded) -> B x 256 x 64 x 64."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0])
        res = img_size // 4
        num_layers = len(depths)
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            downsample = None
            if i < num_layers - 1:
                # The last merging keeps the grid (stride 1) so the output is img_size / 16.
                stride = 1 if i == num_layers - 2 else 2
                downsample = PatchMerging(input_resolution=(res, res), dim=embed_dims[i],
                                          out_dim=embed_dims[i + 1], stride=stride)
            if i == 0:
                layer: nn.Module = ConvLayer(dim=embed_dims[0], depth=depths[0],
                                             expand_ratio=mbconv_expand_ratio, downsample=downsample)
            else:
                layer = BasicLayer(dim=embed_dims[i], input_resolution=(res, res), depth=depths[i],
                                   num_heads=num_heads[i], window_size=window_sizes[i], mlp_ratio=mlp_ratio,
                                   local_conv_size=local_conv_size, downsample=downsample)
            self.layers.append(layer)
            if downsample is not None and stride == 2:
                res //= 2
        self.out_resolution = res
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = sam_neck(embed_dims[-1], out_chans)

    def forward(self, x: Tensor) -> Tensor:
        """x: B x 3 x 1024 x 1024 -> B x 256 x 64 x 64."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_resolution, self.out_resolution, c).permute(0, 3, 1, 2)
        return self.neck(x)
