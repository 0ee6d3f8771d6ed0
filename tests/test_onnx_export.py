"""decoder.onnx: equal to the PyTorch decoder for every prompt kind at any image size,
display outputs consistent with the logits, quantized variant close to fp32, every model exports."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from trimask.cli import main as cli_main
from trimask.export import verify
from trimask.export.onnx_decoder import DISPLAY_LONG_SIDE, OPSET, DecoderOnnx, export_decoder, uint8_column_error
from trimask.models.build import build_sam

SIZES = [(480, 640), (1024, 1536), (3000, 4000), (1500, 843)]  # the last one portrait
KINDS = ["point", "points", "box", "box+points", "mask"]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random init leaves biases, norms and embeddings in special states; perturb all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def sam():
    model = build_sam("vit_b")  # random official-format weights; the decoder is the same for every type
    _perturb(model.prompt_encoder, 1)
    _perturb(model.mask_decoder, 2)
    return model


@pytest.fixture(scope="module")
def onnx_path(sam, tmp_path_factory):
    return export_decoder(sam, tmp_path_factory.mktemp("onnx") / "decoder.onnx")


@pytest.fixture(scope="module")
def session(onnx_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _embedding(seed: int) -> np.ndarray:
    # SAM embeddings are roughly zero-mean with a std of a few tenths.
    return (np.random.default_rng(seed).standard_normal((1, 256, 64, 64)) * 0.3).astype(np.float32)


def _prompt(kind: str, size: tuple[int, int], seed: int, sam, embedding) -> verify.Prompt:
    rng = np.random.default_rng(seed)
    if kind != "mask":
        return verify.random_prompt(rng, size, kind)
    prompt = verify.random_prompt(rng, size, "point")
    _, low_res = verify.torch_reference(sam, embedding, prompt, size)
    prompt.mask_input = low_res[:, 2:3]  # refine with the previous "part" candidate
    return prompt


def _display_reference(low_res: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Display masks computed another way: grid_sample of the logits at display pixel centres."""
    h, w = size
    h1, w1 = verify.resized_hw(size)
    hd, wd = verify.resized_hw(size, DISPLAY_LONG_SIDE)
    ys = (np.arange(hd) + 0.5) / hd * h1 / 1024 * 2 - 1
    xs = (np.arange(wd) + 0.5) / wd * w1 / 1024 * 2 - 1
    grid = np.stack(np.meshgrid(xs, ys), -1)[None].astype(np.float32)
    sampled = F.grid_sample(
        torch.from_numpy(low_res), torch.from_numpy(grid), mode="bilinear", padding_mode="border",
        align_corners=False,
    )
    return (sampled > 0).numpy()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_matches_pytorch_decoder(session, sam, kind, size):
    embedding = _embedding(hash((kind, size)) % 1000)
    prompt = _prompt(kind, size, seed=7, sam=sam, embedding=embedding)
    iou, low_res, display, areas = session.run(None, verify.onnx_feeds(embedding, prompt, size))
    ref_iou, ref_low_res = verify.torch_reference(sam, embedding, prompt, size)

    assert low_res.shape == (1, 4, 256, 256) and iou.shape == (1, 4)
    scale = np.abs(ref_low_res).max()
    assert np.abs(low_res - ref_low_res).max() <= 1e-4 * scale
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-4, atol=1e-5)
    # Thresholded masks: identical but for a few pixels where the logit is ~0.
    assert ((low_res > 0) != (ref_low_res > 0)).sum() <= 4

    hd, wd = verify.resized_hw(size, DISPLAY_LONG_SIDE)
    assert display.shape == (1, 4, hd, wd) and display.dtype == np.uint8
    assert set(np.unique(display)) <= {0, 255}
    mismatch = ((display > 0) != _display_reference(ref_low_res, size)).sum()
    assert mismatch <= max(4, display.size // 5000)
    np.testing.assert_allclose(areas, (display > 0).mean(axis=(2, 3)), atol=1e-6)


def test_graph_is_valid_opset17_with_standard_ops_and_no_fixed_image_size(onnx_path):
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    # Only standard-domain ops: onnxruntime-web's WASM backend runs all of them.
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["image_embeddings"] == [1, 256, 64, 64]
    assert inputs["point_coords"][2] == 2 and isinstance(inputs["point_coords"][1], str)
    assert inputs["orig_im_size"] == [2]
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs["iou_predictions"] == [1, 4]
    assert outputs["low_res_masks"] == [1, 4, 256, 256]
    assert outputs["display_masks"][:2] == [1, 4] and all(isinstance(d, str) for d in outputs["display_masks"][2:])
    assert outputs["areas"] == [1, 4]


def test_embeddings_from_the_image_encoder_decode_equal(session, sam):
    """One case with an embedding made by an actual encoder from an image, not noise."""
    tiny = build_sam("tiny", random_init=True)
    yy, xx = np.mgrid[0:600, 0:800]
    image = np.zeros((600, 800, 3), np.uint8)
    image[..., 0] = 200 * (((yy - 300) ** 2 + (xx - 350) ** 2) < 150**2)
    image[..., 1] = (xx / 800 * 255).astype(np.uint8)
    image[..., 2] = 90
    from trimask.preprocess import preprocess

    with torch.no_grad():
        embedding = tiny.image_encoder(preprocess(image)).numpy()
    prompt = verify.Prompt(np.array([[350.0, 300.0], [700.0, 100.0]], np.float32), np.array([1.0, 0.0], np.float32))
    iou, low_res, _, _ = session.run(None, verify.onnx_feeds(embedding, prompt, (600, 800)))
    ref_iou, ref_low_res = verify.torch_reference(sam, embedding, prompt, (600, 800))
    assert np.abs(low_res - ref_low_res).max() <= 1e-4 * np.abs(ref_low_res).max()
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-4, atol=1e-5)


def test_display_masks_agree_with_sams_full_resolution_postprocessing():
    """On smooth logits (a disc, a stripe; slope ~1 per low-res pixel) the display mask is SAM's
    full-resolution mask sampled at display pixel centres: they differ only where the logit is
    within a quarter of a low-res pixel of the boundary (sub-pixel sampling offsets), not by a shift."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    disc = 60.0 - np.hypot(yy - 70, xx - 120)
    stripe = 10.0 - np.abs(xx - 0.6 * yy - 40)
    logits = np.stack([disc, stripe, -disc, disc - 30])[None].astype(np.float32)
    module = DecoderOnnx(build_sam("tiny", random_init=True))
    for size in [(480, 640), (1024, 1536), (3000, 4000), (1500, 843), (100, 3000)]:
        sampled_logits = module.display(torch.from_numpy(logits), torch.tensor(size, dtype=torch.float32))[0].numpy()
        hd, wd = sampled_logits.shape[1:]
        assert (hd, wd) == verify.resized_hw(size, DISPLAY_LONG_SIDE)
        full = verify.full_resolution_masks(logits, size)
        rows = np.minimum(((np.arange(hd) + 0.5) * size[0] / hd).astype(int), size[0] - 1)
        cols = np.minimum(((np.arange(wd) + 0.5) * size[1] / wd).astype(int), size[1] - 1)
        differ = full[:, rows][:, :, cols] != (sampled_logits > 0)
        assert np.all(np.abs(sampled_logits[differ]) < 0.25), size
        assert differ.sum() <= 0.01 * (sampled_logits > 0).sum(), size


@pytest.fixture(scope="module")
def quantized_session(sam, tmp_path_factory):
    path = export_decoder(sam, tmp_path_factory.mktemp("onnxq") / "decoder.quant.onnx", quantize=True)
    onnx.checker.check_model(str(path))
    return path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_quantized_decoder_is_smaller_and_agrees_with_fp32(session, quantized_session, onnx_path):
    path, quantized = quantized_session
    assert path.stat().st_size < 0.4 * onnx_path.stat().st_size
    stats = verify.agreement(session, quantized, [_embedding(1), _embedding(2)], (768, 1024), 6)
    assert stats["iou_mean"] >= 0.9
    assert stats["score_diff_max"] <= 0.1
    feeds = verify.onnx_feeds(_embedding(3), verify.Prompt(box=(10, 20, 300, 400)), (3000, 4000))
    outputs = quantized.run(None, feeds)
    assert [o.shape for o in outputs] == [(1, 4), (1, 4, 256, 256), (1, 4, 384, 512), (1, 4)]


def test_quantization_keeps_in_fp32_the_weights_one_uint8_scale_cannot_hold(quantized_session):
    rng = np.random.default_rng(0)
    trained_like = rng.normal(0, 0.05, (256, 256)).astype(np.float32)
    assert uint8_column_error(trained_like) < 0.02
    mixed = trained_like.copy()
    mixed[:, 0] *= 100  # one large output channel: the others fall to a few uint8 steps
    assert uint8_column_error(mixed) > 0.3
    # The positional encoding's coordinate frequencies (2 x 128, a Gaussian of scale 1) are such a
    # matrix: they stay a float MatMul in the quantized graph, the transformer's weights do not.
    path, _ = quantized_session
    nodes = onnx.load(str(path)).graph.node
    assert [n.op_type for n in nodes if n.name == "/pe_layer/MatMul"] == ["MatMul"]
    assert sum(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in nodes) >= 20


def test_laid_out_weights_stay_fp32_so_the_bundled_tiny_quantizes(tmp_path):
    from trimask.export import onnx_decoder
    from trimask.preprocess import preprocess
    from trimask.training.scenes import generate_scene

    rng = np.random.default_rng(0)
    selection = np.zeros((256, 128), np.float32)
    selection[rng.choice(256, 128, replace=False), np.arange(128)] = rng.choice([-1.0, 1.0], 128)
    assert onnx_decoder._laid_out(selection)
    assert not onnx_decoder._laid_out(rng.normal(0, 0.05, (256, 128)).astype(np.float32))
    assert not onnx_decoder._laid_out(np.zeros((4, 4), np.float32))
    # The bundled tiny's decoder routes its marks through such matrices; quantizing their inputs per call
    # (the final attention's value projection above all) took its agreement with fp32 to about 0.4.
    tiny = build_sam("tiny").eval()
    scene = generate_scene(10**9 + 1)
    with torch.no_grad():
        embedding = tiny.image_encoder(preprocess(scene.image)).numpy()
    fp32 = ort.InferenceSession(str(export_decoder(tiny, tmp_path / "d.onnx")), providers=["CPUExecutionProvider"])
    path = export_decoder(tiny, tmp_path / "q.onnx", quantize=True)
    kept = [n.op_type for n in onnx.load(str(path)).graph.node if n.name == "/transformer/final_attn_token_to_image/v_proj/MatMul"]
    assert kept == ["MatMul"]
    quantized = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stats = verify.agreement(fp32, quantized, [embedding], scene.image.shape[:2], 12, seed=1)
    assert stats["iou_mean"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_t", "tiny"])
def test_other_models_export_and_run(model_type, tmp_path):
    model = build_sam(model_type, random_init=True)
    path = export_decoder(model, tmp_path / "decoder.onnx")
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = verify.Prompt(np.array([[100.0, 50.0]], np.float32), np.array([1.0], np.float32))
    embedding = _embedding(5)
    iou, low_res, display, areas = sess.run(None, verify.onnx_feeds(embedding, prompt, (400, 300)))
    ref_iou, ref_low_res = verify.torch_reference(model, embedding, prompt, (400, 300))
    assert display.shape == (1, 4, 512, 384)
    assert np.abs(low_res - ref_low_res).max() <= 1e-4 * np.abs(ref_low_res).max()


def test_cli_exports_a_loadable_file_and_reports_bad_models_in_one_line(tmp_path, capsys):
    out = tmp_path / "dec.onnx"
    assert cli_main(["export-onnx", "--model", "vit_b", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["iou_predictions", "low_res_masks", "display_masks", "areas"]
    capsys.readouterr()
    assert cli_main(["export-onnx", "--model", "vit_x", "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trimask export-onnx: error:") and "vit_x" in err[-1]
    assert cli_main(["export-onnx", "--model", "vit_b", "--checkpoint", str(tmp_path / "none.pth"),
                     "--out", str(tmp_path / "y.onnx")]) == 1
    assert not (tmp_path / "y.onnx").exists()


_ORT_WEB_RUN = """
import fs from "node:fs";
import { pathToFileURL } from "node:url";
const [modulePath, modelPath, dir] = process.argv.slice(2);
const ort = await import(pathToFileURL(modulePath).href);
ort.env.wasm.numThreads = 1;
const session = await ort.InferenceSession.create(fs.readFileSync(modelPath), { executionProviders: ["wasm"] });
const inputs = JSON.parse(fs.readFileSync(`${dir}/inputs.json`));
const feeds = {};
for (const [name, shape] of Object.entries(inputs)) {
  const buf = fs.readFileSync(`${dir}/${name}.bin`);
  feeds[name] = new ort.Tensor("float32", new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), shape);
}
const out = await session.run(feeds);
const shapes = {};
for (const [name, tensor] of Object.entries(out)) {
  fs.writeFileSync(`${dir}/out_${name}.bin`, Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength));
  shapes[name] = [tensor.type, tensor.dims];
}
fs.writeFileSync(`${dir}/outputs.json`, JSON.stringify(shapes));
"""


def _ort_web_module():
    import shutil
    from pathlib import Path

    module = Path(__file__).resolve().parent.parent / "frontend/node_modules/onnxruntime-web/dist/ort.node.min.mjs"
    if shutil.which("node") is None or not module.is_file():
        pytest.skip("node or frontend/node_modules/onnxruntime-web is not installed")
    return module


def _run_in_ort_web(model_path, feeds: dict[str, np.ndarray], tmp_path) -> dict[str, np.ndarray]:
    """Run a model in onnxruntime-web's WASM backend (in Node) -> its outputs."""
    import json
    import subprocess

    module = _ort_web_module()
    for name, value in feeds.items():
        value.astype(np.float32).tofile(tmp_path / f"{name}.bin")
    (tmp_path / "inputs.json").write_text(json.dumps({k: list(v.shape) for k, v in feeds.items()}))
    script = tmp_path / "run.mjs"
    script.write_text(_ORT_WEB_RUN)
    subprocess.run(["node", str(script), str(module), str(model_path), str(tmp_path)], check=True, timeout=300)
    dtypes = {"float32": np.float32, "uint8": np.uint8, "int64": np.int64}
    shapes = json.loads((tmp_path / "outputs.json").read_text())
    return {
        name: np.fromfile(tmp_path / f"out_{name}.bin", dtype=dtypes[kind]).reshape(dims)
        for name, (kind, dims) in shapes.items()
    }


@pytest.mark.slow
def test_decoder_runs_in_onnxruntime_web_wasm_with_the_same_outputs(onnx_path, session, quantized_session, tmp_path):
    """The browser's runtime (onnxruntime-web, WASM backend, run in Node) has every op of the
    fp32 and quantized graphs and computes the same outputs as native onnxruntime."""
    _ort_web_module()
    size = (1500, 843)
    feeds = verify.onnx_feeds(_embedding(21), verify.random_prompt(np.random.default_rng(4), size, "box+points"), size)
    for name, (path, native) in {"fp32": (onnx_path, session), "quant": quantized_session}.items():
        folder = tmp_path / name
        folder.mkdir()
        web = _run_in_ort_web(path, feeds, folder)
        expected = dict(zip([o.name for o in native.get_outputs()], native.run(None, feeds)))
        assert set(web) == set(expected)
        for key, value in expected.items():
            assert web[key].shape == value.shape and web[key].dtype == value.dtype
        scale = np.abs(expected["low_res_masks"]).max()
        if name == "fp32":
            assert np.abs(web["low_res_masks"] - expected["low_res_masks"]).max() <= 1e-4 * scale
            assert ((web["display_masks"] > 0) != (expected["display_masks"] > 0)).sum() <= 4
            np.testing.assert_allclose(web["iou_predictions"], expected["iou_predictions"], atol=1e-4)
        else:
            # Integer kernels differ between the WASM and x86 builds (activation rounding), so the
            # quantized graph agrees as closely as quantized and fp32 do, not to float precision.
            for token in range(4):
                assert verify.mask_iou(web["low_res_masks"][0, token] > 0, expected["low_res_masks"][0, token] > 0) >= 0.95
            np.testing.assert_allclose(web["iou_predictions"], expected["iou_predictions"], atol=0.02)


def test_outputs_equal_the_official_onnx_wrapper_with_the_same_weights(sam, session):
    """The contract: low_res_masks / iou_predictions equal the official implementation's
    (segment_anything's SamOnnxModel, the reference only) for the same weights and inputs."""
    from segment_anything import sam_model_registry
    from segment_anything.utils.onnx import SamOnnxModel

    official = sam_model_registry["vit_b"]()
    official.load_state_dict(sam.state_dict())
    wrapper = SamOnnxModel(official.eval(), return_single_mask=False)
    rng = np.random.default_rng(9)
    for kind, size in [("point", (480, 640)), ("points", (1500, 843)), ("box+points", (3000, 4000)),
                       ("mask", (1024, 1536))]:
        embedding = _embedding(30)
        feeds = verify.onnx_feeds(embedding, _prompt(kind, size, int(rng.integers(1000)), sam, embedding), size)
        with torch.no_grad():
            _, ref_iou, ref_low_res = wrapper(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        iou, low_res = session.run(["iou_predictions", "low_res_masks"], feeds)
        assert np.abs(low_res - ref_low_res.numpy()).max() <= 1e-4 * np.abs(ref_low_res.numpy()).max()
        np.testing.assert_allclose(iou, ref_iou.numpy(), rtol=1e-4, atol=1e-5)
