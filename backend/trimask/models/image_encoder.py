"""SAM's ViT image encoder (ViT-B/L/H): B x 3 x 1024 x 1024 -> B x 256 x 64 x 64.

16x16 patches, absolute position embedding, transformer blocks with 14x14 windowed attention
except a few global blocks, decomposed relative position terms (MViTv2) in every block, and a
conv neck to 256 channels. Parameter names follow the official checkpoints.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with the relative
position term passed as an additive mask, so CUDA uses a fused (memory-efficient) kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trimask.models.common import MLPBlock, sam_neck

# Which blocks attend globally (all others use 14x14 windows), as in the official models.
GLOBAL_ATTN_INDEXES = {
    "vit_b": (2, 5, 8, 11),
    "vit_l": (5, 11, 17, 23),
    "vit_h": (7, 15, 23, 31),
}


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """B x H x W x C -> (B*nW) x ws x ws x C, zero-padding H and W up to multiples of ws.

    Returns the windows and the padded (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """(B*nW) x ws x ws x C -> B x H x W x C, dropping the padding added by window_partition."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    rel_pos: L x C table (L = 2*size-1 at the trained size; linearly resized otherwise).
    Returns q_size x k_size x C.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.T.unsqueeze(0), size=max_rel_dist, mode="linear")
        rel_pos = resized.squeeze(0).T
    # Scale the shorter axis' coordinates when q and k differ in length (as in MViTv2).
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> Tensor:
    """The additive attention term of decomposed relative positions.

    q: B x heads x (qh*qw) x C (unscaled queries). Returns B x heads x (qh*qw) x (kh*kw).
    """
    qh, qw = q_size
    kh, kw = k_size
    rh = get_rel_pos(qh, kh, rel_pos_h).to(q.dtype)  # qh x kh x C
    rw = get_rel_pos(qw, kw, rel_pos_w).to(q.dtype)  # qw x kw x C
    b, n_heads, _, c = q.shape
    r_q = q.reshape(b, n_heads, qh, qw, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # B x heads x qh x qw x kh
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # B x heads x qh x qw x kw
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x heads x qh x qw x kh x kw
    return bias.reshape(b, n_heads, qh * qw, kh * kw)


class Attention(nn.Module):
    """Multi-head self-attention on a B x H x W x C grid, with decomposed relative positions."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        """input_size: the (H, W) this layer attends over (the window, or the whole grid), sizing rel_pos."""
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the input size")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x HW x head_dim
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when window_size > 0, global otherwise."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: B x 3 x H x W -> B x H/p x W/p x embed_dim."""

    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class LayerNormEps6(nn.LayerNorm):
    """LayerNorm with SAM's eps (1e-6)."""

    def __init__(self, normalized_shape: int) -> None:
        super().__init__(normalized_shape, eps=1e-6)


class ImageEncoderViT(nn.Module):
    """SAM's ViT encoder: B x 3 x img_size x img_size -> B x out_chans x img_size/16 x img_size/16."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = LayerNormEps6,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = sam_neck(embed_dim, out_chans)

    def forward(self, x: Tensor) -> Tensor:
        """x: B x 3 x 1024 x 1024 normalized and padded -> B x 256 x 64 x 64."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
