"""SAM's prompt encoder: points, boxes and a low-res mask -> sparse and dense prompt embeddings.

Parameter and buffer names follow the official checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trimask.models.common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random Fourier features: (x, y) in [0,1]^2 -> sin/cos of a fixed projection.

    The 2 x F projection matrix is a buffer saved in checkpoints, so encodings match the weights.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """coords: ... x 2, normalized to [0,1] -> ... x 2F."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of the centres of an H x W grid: -> 2F x H x W."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # H x W x 2 (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: Tensor, image_size: tuple[int, int]) -> Tensor:
        """coords_input: B x N x 2 pixel (x, y) in an image of image_size (H, W) -> B x N x 2F."""
        h, w = image_size
        scale = torch.tensor([w, h], dtype=torch.float32, device=coords_input.device)
        return self._pe_encoding(coords_input.to(torch.float32) / scale)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Sparse: one embedding per point / box corner (positional encoding + a learned type embedding).
    Dense: the mask prompt downscaled 4x to the image-embedding grid, or a learned "no mask" vector.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        """
        embed_dim: prompt embedding channels (256).
        image_embedding_size: (H, W) of the image embedding grid (64, 64).
        input_image_size: (H, W) of the padded encoder input (1024, 1024).
        mask_in_chans: hidden channels of the mask downscaler (16).
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Index = point label: 0 background, 1 foreground, 2 box top-left, 3 box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # Indexes 0,1,3,4,6 hold weights; they must stay where the checkpoints expect them.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image embedding grid: 1 x embed_dim x H x W."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """points: B x N x 2 (1024 frame, x y), labels: B x N -> B x N(+1 if pad) x embed_dim.

        Labels 2 and 3 (box corners given as points, as in the ONNX decoder) get the corner
        embeddings; the official PyTorch encoder only sees 0, 1 and -1 here, for which this is
        the same computation.
        """
        points = points + 0.5  # centre of the pixel
        if pad:
            # Without a box the official model appends one "not a point" token.
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        for index in range(self.num_point_embeddings):
            embedding = embedding + (labels == index).to(embedding.dtype) * self.point_embeddings[index].weight
        return embedding

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes: B x 4 (x0 y0 x1 y1, 1024 frame) -> B x 2 x embed_dim."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return embedding + corner_types

    def _embed_masks(self, masks: Tensor) -> Tensor:
        """masks: B x 1 x 4H x 4W logits -> B x embed_dim x H x W."""
        return self.mask_downscaling(masks)

    @staticmethod
    def _batch_size(points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """
        points: (coords B x N x 2, labels B x N) or None; boxes: B x 4 or None;
        masks: B x 1 x 256 x 256 or None (all in the 1024 input frame).
        Returns sparse B x N' x embed_dim (points, then box corners) and dense B x embed_dim x 64 x 64.
        """
        bs = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse = [torch.empty((bs, 0, self.embed_dim), device=device)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self._embed_masks(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse_embeddings, dense_embeddings
