"""Checkpoint loading: strict, official and wrapped formats, clear errors, identities, `trimask weights`."""
from __future__ import annotations

import hashlib

import pytest
import torch

from checkpoint_factory import make_official_checkpoint, make_shape_only_checkpoint, mobile_sam_available
from trimask.cli import main as cli_main
from trimask.errors import TrimaskError
from trimask.models import build as build_module
from trimask.models.build import build_sam, guess_model_type, model_identity, read_checkpoint
from trimask.weights_table import OFFICIAL_WEIGHTS, by_model_type


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """Keep the on-disk hash cache and the weights folder out of the user's home."""
    monkeypatch.setenv("TRIMASK_HASH_CACHE", str(tmp_path / "hashes.json"))
    monkeypatch.setenv("TRIMASK_WEIGHTS", str(tmp_path / "weights"))


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory):
    return make_official_checkpoint("vit_b", tmp_path_factory.mktemp("ckpt") / "vit_b.pth", seed=5)


@pytest.fixture(scope="module")
def shape_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    types = ["vit_h", "vit_l", "vit_b"] + (["vit_t"] if mobile_sam_available() else [])
    return {t: make_shape_only_checkpoint(t, folder / f"{t}.pth") for t in types}


def test_official_file_loads_strictly_with_its_values(vit_b_file):
    sam = build_sam("vit_b", vit_b_file)
    state = torch.load(vit_b_file, weights_only=True)
    ours = sam.state_dict()
    assert set(ours) == set(state)
    for key in ("image_encoder.blocks.2.attn.rel_pos_h", "image_encoder.pos_embed",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.iou_token.weight"):
        assert torch.equal(ours[key], state[key])
    assert not sam.training


def test_wrapped_model_dict_loads_like_the_raw_file(vit_b_file, tmp_path):
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(vit_b_file, weights_only=True), "step": 3}, wrapped)
    a, b = build_sam("vit_b", vit_b_file), build_sam("vit_b", wrapped)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("file_type, asked", [("vit_l", "vit_h"), ("vit_h", "vit_b"), ("vit_b", "vit_l"),
                                              ("vit_t", "vit_b"), ("vit_b", "vit_t")])
def test_file_of_another_type_is_an_error_naming_both_types(shape_only, file_type, asked):
    if file_type not in shape_only:
        pytest.skip("MobileSAM reference (mobilesam-mirror) not installed")
    with pytest.raises(TrimaskError) as info:
        build_sam(asked, shape_only[file_type])
    message = str(info.value)
    assert asked in message and f"looks like a {file_type}" in message
    assert "\n" not in message


def test_shape_only_files_are_recognised_as_their_type(shape_only):
    for model_type, path in shape_only.items():
        assert guess_model_type(read_checkpoint(path)[0]) == model_type


def test_unrecognised_state_dict_names_the_model_and_the_mismatch(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, path)
    with pytest.raises(TrimaskError, match=r"does not fit model vit_b: .*missing.*unexpected"):
        build_sam("vit_b", path)


def test_one_missing_key_is_an_error(vit_b_file, tmp_path):
    state = torch.load(vit_b_file, weights_only=True)
    del state["image_encoder.blocks.0.attn.rel_pos_w"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(TrimaskError, match=r"vit_b.*1 missing \(e\.g\. image_encoder\.blocks\.0\.attn\.rel_pos_w\)"):
        build_sam("vit_b", path)


def test_truncated_file_is_a_clear_error(vit_b_file, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(vit_b_file.read_bytes()[: 10_000_000])
    with pytest.raises(TrimaskError, match="truncated, corrupt"):
        build_sam("vit_b", path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_non_checkpoint_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(TrimaskError, match=str(path)):
        build_sam("vit_b", path)


def test_checkpoint_holding_no_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(TrimaskError, match="does not hold a model state dict"):
        build_sam("vit_b", path)


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(TrimaskError, match="not found"):
        build_sam("vit_h", tmp_path / "nope.pth")
    with pytest.raises(TrimaskError, match="not a file"):
        build_sam("vit_h", tmp_path)


def test_unknown_model_type_is_an_error():
    with pytest.raises(TrimaskError, match="vit_x"):
        build_sam("vit_x")


def test_random_init_is_deterministic_and_official_shaped():
    a, b = build_sam("vit_b"), build_sam("vit_b")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert model_identity("vit_b") == "vit_b-random"


def test_tiny_without_bundled_weights_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(build_module, "BUNDLED_TINY_CHECKPOINT", tmp_path / "tiny.pt")
    with pytest.raises(TrimaskError, match="tiny"):
        build_sam("tiny")


def test_identity_is_type_and_sha256_prefix_and_follows_the_content(vit_b_file, tmp_path):
    digest = hashlib.sha256(vit_b_file.read_bytes()).hexdigest()
    assert model_identity("vit_b", vit_b_file) == f"vit_b-{digest[:16]}"
    copy = tmp_path / "copy.pth"
    copy.write_bytes(b"first")
    first = model_identity("vit_b", copy)
    copy.write_bytes(b"second content")  # new size and mtime: must not reuse the cached hash
    assert model_identity("vit_b", copy) != first
    assert model_identity("vit_b", copy) == "vit_b-" + hashlib.sha256(b"second content").hexdigest()[:16]


def test_identity_hash_is_cached_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    identity = model_identity("vit_l", path)
    build_module._memory_hashes.clear()
    monkeypatch.setattr(build_module, "sha256_file", lambda *a, **k: pytest.fail("hashed again"))
    assert model_identity("vit_l", path) == identity


def test_weights_table_lists_the_four_official_files():
    assert [w.model_type for w in OFFICIAL_WEIGHTS] == ["vit_h", "vit_l", "vit_b", "vit_t"]
    for entry in OFFICIAL_WEIGHTS:
        assert entry.url.startswith("https://") and entry.url.endswith(entry.file_name)
        assert entry.sha256 is None or len(entry.sha256) == 64
    assert by_model_type("vit_h").file_name == "sam_vit_h_4b8939.pth"


def test_weights_command_lists_files_and_presence(tmp_path, capsys):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "mobile_sam.pt").write_bytes(b"x")
    assert cli_main(["weights", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    for entry in OFFICIAL_WEIGHTS:
        assert entry.file_name in out and entry.url in out
    assert "mobile_sam.pt" in out and "present, size differs" in out and "missing" in out


def test_weights_verify_accepts_a_good_file_and_rejects_a_wrong_type(vit_b_file, shape_only, capsys):
    assert cli_main(["weights", "--verify", str(vit_b_file)]) == 0
    assert "loads strictly as vit_b" in capsys.readouterr().out
    assert cli_main(["weights", "--verify", str(shape_only["vit_l"]), "--model", "vit_h"]) == 1
    err = capsys.readouterr().err
    assert "vit_h" in err and "vit_l" in err


def test_weights_verify_rejects_a_file_named_official_with_other_content(tmp_path, capsys):
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"not the real weights")
    assert cli_main(["weights", "--verify", str(fake)]) == 1
    assert "sha256 differs" in capsys.readouterr().err
