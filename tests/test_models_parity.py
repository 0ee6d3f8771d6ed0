"""Our SAM modules against the official implementations, with the same random official-format weights.

References: ``segment_anything`` (facebookresearch) for vit_b/l/h and the decoder; MobileSAM's
``mobile_sam`` package (PyPI: mobilesam-mirror) for vit_t. Tolerance: 1e-4 relative L2, fp32, CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoint_factory import (
    make_official_checkpoint,
    mobile_sam_available,
    official_skeleton,
    reference_model,
)
from trimask.models.build import build_sam, construct_sam
from trimask.preprocess import preprocess

TOLERANCE = 1e-4


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    if ref.numel() == 0:
        return 0.0
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An image with smooth gradients, shapes and noise (not square, so the input is padded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 5) ** 2] = (230, 40, 60)
    img[h // 6 : h // 3, w // 2 : w - w // 8] = (20, 200, 90)
    img = img + rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    return make_official_checkpoint("vit_b", tmp_path_factory.mktemp("ckpt") / "vit_b.pth", seed=1)


@pytest.fixture(scope="module")
def vit_b_pair(vit_b_checkpoint):
    return reference_model("vit_b", vit_b_checkpoint), build_sam("vit_b", vit_b_checkpoint)


@pytest.fixture(scope="module")
def encoder_input():
    return preprocess(synthetic_image(600, 800))


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_state_dict_keys_and_shapes_equal_official(model_type):
    if model_type == "vit_t" and not mobile_sam_available():
        pytest.skip("MobileSAM reference (mobilesam-mirror) not installed")
    official = official_skeleton(model_type)
    with torch.device("meta"):
        ours = construct_sam(model_type)
    official_shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == official_shapes


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_global_attention_blocks_at_official_indexes(model_type):
    official = official_skeleton(model_type)
    with torch.device("meta"):
        ours = construct_sam(model_type)
    official_windows = [b.window_size for b in official.image_encoder.blocks]
    assert [b.window_size for b in ours.image_encoder.blocks] == official_windows
    assert official_windows.count(0) == 4


@pytest.mark.slow
def test_vit_b_embedding_matches_official(vit_b_pair, encoder_input):
    reference, ours = vit_b_pair
    with torch.no_grad():
        expected = reference.image_encoder(encoder_input)
        actual = ours.image_encoder(encoder_input)
    assert actual.shape == (1, 256, 64, 64)
    assert rel_l2(actual, expected) < TOLERANCE


@pytest.mark.slow
def test_vit_t_embedding_matches_mobile_sam(tmp_path_factory, encoder_input):
    if not mobile_sam_available():
        pytest.skip("MobileSAM reference (mobilesam-mirror) not installed")
    path = make_official_checkpoint("vit_t", tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt", seed=2)
    reference, ours = reference_model("vit_t", path), build_sam("vit_t", path)
    with torch.no_grad():
        expected = reference.image_encoder(encoder_input)
        actual = ours.image_encoder(encoder_input)
    assert actual.shape == (1, 256, 64, 64)
    assert rel_l2(actual, expected) < TOLERANCE


def _prompts(kind: str) -> dict:
    g = torch.Generator().manual_seed(3)
    points = torch.tensor([[[412.0, 300.5], [700.0, 150.0], [90.0, 600.0]]])
    labels = torch.tensor([[1, 0, 1]])
    box = torch.tensor([[120.0, 80.0, 760.0, 590.0]])
    mask = torch.randn(1, 1, 256, 256, generator=g) * 4
    return {
        "point": dict(points=(points[:, :1], labels[:, :1]), boxes=None, masks=None),
        "points": dict(points=(points, labels), boxes=None, masks=None),
        "box": dict(points=None, boxes=box, masks=None),
        "box+points": dict(points=(points, labels), boxes=box, masks=None),
        "points+mask_input": dict(points=(points, labels), boxes=None, masks=mask),
        "mask_input": dict(points=None, boxes=None, masks=mask),
        "batch of 2 point sets": dict(points=(points[:, :2].repeat(2, 1, 1) + torch.tensor([[[0.0]], [[33.0]]]),
                                              labels[:, :2].repeat(2, 1)), boxes=None, masks=None),
    }[kind]


@pytest.fixture(scope="module")
def image_embedding():
    return torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize(
    "kind", ["point", "points", "box", "box+points", "points+mask_input", "mask_input", "batch of 2 point sets"]
)
def test_prompt_encoder_and_decoder_match_official_for_all_four_tokens(vit_b_pair, image_embedding, kind):
    reference, ours = vit_b_pair
    prompts = _prompts(kind)
    with torch.no_grad():
        ref_sparse, ref_dense = reference.prompt_encoder(**prompts)
        sparse, dense = ours.prompt_encoder(**prompts)
        assert rel_l2(sparse, ref_sparse) < TOLERANCE
        assert rel_l2(dense, ref_dense) < TOLERANCE
        ref_masks, ref_iou = reference.mask_decoder.predict_masks(
            image_embedding, reference.prompt_encoder.get_dense_pe(), ref_sparse, ref_dense
        )
        masks, iou = ours.mask_decoder.predict_masks(image_embedding, ours.prompt_encoder.get_dense_pe(), sparse, dense)
    assert masks.shape == ref_masks.shape == (ref_sparse.shape[0], 4, 256, 256)
    for token in range(4):
        assert rel_l2(masks[:, token], ref_masks[:, token]) < TOLERANCE
    assert rel_l2(iou, ref_iou) < TOLERANCE


@pytest.mark.parametrize("multimask_output", [True, False])
def test_decoder_forward_selects_tokens_as_official(vit_b_pair, image_embedding, multimask_output):
    reference, ours = vit_b_pair
    prompts = _prompts("points")
    with torch.no_grad():
        sparse, dense = reference.prompt_encoder(**prompts)
        pe = reference.prompt_encoder.get_dense_pe()
        ref_masks, ref_iou = reference.mask_decoder(image_embedding, pe, sparse, dense, multimask_output)
        masks, iou = ours.mask_decoder(image_embedding, pe, sparse, dense, multimask_output)
    assert masks.shape == ref_masks.shape
    assert rel_l2(masks, ref_masks) < TOLERANCE and rel_l2(iou, ref_iou) < TOLERANCE


def test_box_corners_given_as_points_equal_the_box_prompt(vit_b_pair):
    """The ONNX decoder passes a box as two points labelled 2 and 3; same embedding as a box."""
    _, ours = vit_b_pair
    box = torch.tensor([[120.0, 80.0, 760.0, 590.0]])
    with torch.no_grad():
        as_box, _ = ours.prompt_encoder(points=None, boxes=box, masks=None)
        as_points, _ = ours.prompt_encoder(points=(box.view(1, 2, 2), torch.tensor([[2, 3]])), boxes=None, masks=None)
    assert torch.allclose(as_points[:, :2], as_box, atol=1e-6)


def test_sam_decode_returns_official_logits_and_postprocess_matches(vit_b_pair, image_embedding):
    reference, ours = vit_b_pair
    points, labels = _prompts("points")["points"]
    with torch.no_grad():
        masks, iou = ours.decode(image_embedding, point_coords=points, point_labels=labels)
        sparse, dense = reference.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        ref_masks, ref_iou = reference.mask_decoder.predict_masks(
            image_embedding, reference.prompt_encoder.get_dense_pe(), sparse, dense
        )
        assert rel_l2(masks, ref_masks) < TOLERANCE and rel_l2(iou, ref_iou) < TOLERANCE
        ours_full = ours.postprocess_masks(ref_masks, (768, 1024), (600, 800))
        ref_full = reference.postprocess_masks(ref_masks, (768, 1024), (600, 800))
    assert ours_full.shape == (1, 4, 600, 800)
    assert torch.equal(ours_full, ref_full)


def test_preprocess_in_sam_matches_official(vit_b_pair):
    reference, ours = vit_b_pair
    x = torch.from_numpy(synthetic_image(300, 400)).permute(2, 0, 1).float()
    assert torch.equal(ours.preprocess(x), reference.preprocess(x))
