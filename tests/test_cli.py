"""The trimask command as a whole: help for every sub-command, one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trimask.cli import COMMAND_MODULES, build_parser

TRIMASK = [sys.executable, "-m", "trimask.cli"]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_command_module_registers_at_least_one_subcommand():
    names = _subcommands()
    expected = {"serve", "embed", "weights", "export-onnx", "export-coco", "import-coco",
                "train-tiny", "eval", "finetune", "samples"}
    assert expected <= set(names)
    assert len(COMMAND_MODULES) == 7


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run(TRIMASK + ["--help"], capture_output=True, text=True, check=True).stdout
    for name in _subcommands():
        assert name in out


@pytest.mark.parametrize("name", _subcommands())
def test_each_subcommand_has_complete_help(name):
    result = subprocess.run(TRIMASK + [name, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: trimask " + name in result.stdout
    # every option says what it is for
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    sub = action.choices[name]
    assert sub.description, f"{name} has no description"
    for opt in sub._actions:
        if opt.dest != "help":
            assert opt.help, f"{name} option {opt.option_strings or opt.dest} has no help"


def test_no_command_prints_help_and_fails():
    result = subprocess.run(TRIMASK, capture_output=True, text=True)
    assert result.returncode != 0
    assert "COMMAND" in result.stdout


def _one_line_error(args: list[str]) -> str:
    result = subprocess.run(TRIMASK + args, capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_checkpoint_is_one_line_naming_the_file(tmp_path: Path):
    missing = tmp_path / "nowhere" / "sam_vit_b.pth"
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 24), "red").save(image)
    line = _one_line_error(["embed", "--model", "vit_b", "--checkpoint", str(missing),
                            "--out", str(tmp_path / "out"), str(image)])
    assert "sam_vit_b.pth" in line


def test_unknown_model_type_is_one_line_listing_the_choices(tmp_path: Path):
    result = subprocess.run(TRIMASK + ["export-onnx", "--model", "vit_x", "--out", str(tmp_path / "d.onnx")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "vit_b" in result.stderr and "vit_x" in result.stderr


def test_samples_writes_scenes_and_photos(tmp_path: Path):
    out = tmp_path / "samples"
    subprocess.run(TRIMASK + ["samples", "--out", str(out), "--scenes", "2", "--size", "320"], check=True, capture_output=True)
    scenes = sorted(out.glob("scene_*.png"))
    photos = sorted(out.glob("photo_*.jpg"))
    assert len(scenes) == 2
    assert len(photos) >= 3
    from PIL import Image

    with Image.open(scenes[0]) as im:
        assert im.size == (320, 320)
        # a scene has objects on a background, not one flat colour
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 5
    assert (out / ".complete").exists()


@pytest.mark.parametrize("args", [["--window-cells", "4"], ["--window-fraction", "1.5"]])
def test_train_tiny_rejects_bad_window_settings_in_one_line(tmp_path: Path, args: list[str]):
    line = _one_line_error(["train-tiny", "--steps", "1", "--out", str(tmp_path / "t.pt"), *args])
    assert "window" in line
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("args, named", [(["--init", "nowhere/tiny.pt"], "tiny.pt"),
                                         (["--init", "x.pt", "--similarity-init"], "--similarity-init")])
def test_train_tiny_rejects_a_bad_init_in_one_line(tmp_path: Path, args: list[str], named: str):
    line = _one_line_error(["train-tiny", "--steps", "1", "--out", str(tmp_path / "t.pt"), *args])
    assert named in line
    assert not (tmp_path / "t.pt").exists()


def test_train_tiny_init_starts_from_the_given_weights(tmp_path: Path):
    import json

    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint

    def run(name: str, *extra: str) -> dict:
        log = tmp_path / f"{name}.log"
        subprocess.run(TRIMASK + ["train-tiny", "--steps", "1", "--coarse-fraction", "0", "--level-curriculum", "0", "0",
                                  "--threads", "1", "--out", str(tmp_path / f"{name}.pt"), "--log", str(log), *extra],
                       capture_output=True, text=True, check=True)
        return json.loads(log.read_text().splitlines()[-1])

    # lr 0: the step changes nothing, so the written weights are exactly the ones it started from.
    kept = run("kept", "--init", str(BUNDLED_TINY_CHECKPOINT), "--lr", "0")
    state, extra = read_checkpoint(tmp_path / "kept.pt")
    bundled, _ = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    assert state.keys() == bundled.keys()
    assert all(torch.equal(state[k], bundled[k]) for k in bundled)
    assert extra["init"] == str(BUNDLED_TINY_CHECKPOINT)
    # The trained weights answer the first step's clicks far better than a random start does (IoU of
    # each click's candidates with its matched levels; not the loss: 20 x focal punishes a confident
    # miss more than a random start's timid logits).
    scratch = run("scratch")
    assert kept["iou_r1_matched"] > scratch["iou_r1_matched"] + 0.3


@pytest.mark.parametrize("args, named", [(["--code-pretrain-steps", "5"], "--code-match-start"),
                                         (["--code-match-start", "--similarity-init"], "--similarity-init"),
                                         (["--freeze-encoder", "--code-loss-weight", "1"], "--freeze-encoder"),
                                         (["--calibrate-scenes", "3"], "--code-match-start"),
                                         (["--code-match-start", "--calibrate-scenes", "-1"], "--calibrate-scenes"),
                                         (["--calibrate-reads", "2"], "--code-match-start"),
                                         (["--code-match-start", "--calibrate-reads", "-1"], "--calibrate-reads"),
                                         (["--steps", "-1"], "--steps"),
                                         (["--iou-fit-minutes", "-1"], "--iou-fit-minutes"),
                                         (["--iou-fit-scenes", "-1"], "--iou-fit-scenes"),
                                         (["--mark-strengths"], "--init"),
                                         (["--code-match-start", "--code-lr", "0"], "--code-lr"),
                                         (["--code-match-start", "--code-batch", "0"], "--code-batch"),
                                         (["--code-match-start", "--code-workers", "-1"], "--code-workers"),
                                         (["--code-match-start", "--code-keep-trunk"], "--code-pretrain-steps"),
                                         (["--keep-trunk"], "--freeze-decoder"),
                                         (["--freeze-decoder", "--freeze-encoder", "--keep-trunk"], "--freeze-encoder"),
                                         (["--pattern-minutes", "1"], "--code-match-start"),
                                         (["--code-match-start", "--pattern-minutes", "-1"], "--pattern-minutes"),
                                         (["--code-match-start", "--pattern-batch", "0"], "--pattern-batch"),
                                         (["--second-codes"], "--code-match-start"),
                                         (["--code-match-start", "--second-codes"], "--pattern-minutes"),
                                         (["--part-in-whole"], "--code-match-start"),
                                         (["--negative-marks"], "--code-match-start"),
                                         (["--code-match-start", "--calibrate-cut-scenes", "2"], "--pattern-minutes"),
                                         (["--code-match-start", "--calibrate-cut-scenes", "-1"],
                                          "--calibrate-cut-scenes"),
                                         (["--fit-single-scenes", "2"], "--code-match-start"),
                                         (["--code-match-start", "--fit-single-scenes", "-1"], "--fit-single-scenes"),
                                         (["--code-match-start", "--fit-single-steps", "0"], "--fit-single-steps"),
                                         (["--code-path-steps", "2"], "--code-match-start"),
                                         (["--code-match-start", "--code-path-steps", "-1"], "--code-path-steps"),
                                         (["--code-match-start", "--code-path-minutes", "0"], "--code-path-minutes"),
                                         (["--code-match-start", "--code-path-lr", "0"], "--code-path-lr"),
                                         (["--code-match-start", "--code-path-rounds", "-1"], "--code-path-rounds"),
                                         (["--code-match-start", "--code-path-levels", "0", "0", "0"],
                                          "--code-path-levels")])
def test_train_tiny_rejects_conflicting_code_settings(tmp_path: Path, args: list[str], named: str):
    line = _one_line_error(["train-tiny", "--steps", "1", "--out", str(tmp_path / "t.pt"), *args])
    assert named in line
    assert not (tmp_path / "t.pt").exists()


def test_train_tiny_calibrates_the_pattern_cut_and_records_it(tmp_path: Path):
    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, build_sam, read_checkpoint
    from trimask.training.cut_calibration import CUT_GRID

    out = tmp_path / "cut.pt"
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(BUNDLED_TINY_CHECKPOINT), "--steps", "0", "--threads", "1",
                              "--calibrate-cut-scenes", "3", "--out", str(out)],
                   capture_output=True, text=True, check=True)
    _, extra = read_checkpoint(out)
    cut = extra["cut_calibration"]["cut"]
    assert cut in CUT_GRID and extra["cut_calibration"]["clicks"] >= 1
    assert set(extra["cut_calibration"]["mean_iou"]) == {str(c) for c in CUT_GRID}
    assert extra["encoder_kwargs"]["pattern_cut"] == cut
    assert build_sam("tiny", out).image_encoder.pattern_cut == cut


def test_train_tiny_with_code_match_start_records_it(tmp_path: Path):
    import json

    import torch

    from trimask.models.build import build_sam, read_checkpoint
    from trimask.training.decoder_start import FETCH_FREQUENCIES, match_gains, single_read

    log = tmp_path / "run.log"
    subprocess.run(TRIMASK + ["train-tiny", "--steps", "1", "--coarse-fraction", "1",
                              "--level-curriculum", "0", "0", "--threads", "1", "--code-match-start",
                              "--code-pretrain-steps", "3", "--code-batch", "2", "--code-workers", "1",
                              "--freeze-decoder", "--freeze-encoder",
                              "--calibrate-scenes", "3", "--calibrate-reads", "2", "--iou-fit-minutes", "0.02",
                              "--out", str(tmp_path / "t.pt"), "--log", str(log)],
                   capture_output=True, text=True, check=True)
    _, extra = read_checkpoint(tmp_path / "t.pt")
    assert extra["code_match_start"] is True
    assert extra["train"]["train_encoder"] is False and extra["train"]["steps_done"] == 1
    assert extra["iou_fit"]["answers"] >= 1  # the last stage, after SAM's objectives
    assert extra["code_pretrain"]["steps"] == 3 and extra["code_pretrain"]["scenes"] == 6
    assert "codes step 0" in log.read_text()
    sam = build_sam("tiny", tmp_path / "t.pt")
    g = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.allclose(g[:, :8], torch.tensor(FETCH_FREQUENCIES), atol=1e-2)  # the start's layout, kept
    # The thresholds chosen on the calibration scenes are the ones the checkpoint answers with.
    calibration = extra["match_calibration"]
    assert calibration["clicks"] >= 1
    assert match_gains(sam) == pytest.approx(tuple(calibration["gains"]), abs=2e-3)
    assert "match thresholds" in log.read_text()
    # So are token 0's reads, chosen after them.
    reads = extra["read_calibration"]
    assert reads["targets"] >= 1 and reads["iou"]["mean"] >= reads["start_iou"]["mean"]
    assert single_read(sam) == pytest.approx(reads["reads"], abs=2e-3)
    assert "single-mask reads" in log.read_text()
    lines = log.read_text().splitlines()
    assert json.loads(lines[-2])["steps"] == 1 and lines[-1].startswith("iou head fitted: ")


def test_train_tiny_adds_a_pattern_head_to_given_weights_and_keeps_the_rest(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, build_sam, read_checkpoint
    from trimask.preprocess import preprocess
    from trimask.training.decoder_start import PATTERN
    from trimask.training.scenes import generate_scene

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    if "pattern_offset" in (bundled_extra.get("encoder_kwargs") or {}):  # start from weights without a head
        bundled = {k: v for k, v in bundled.items() if not k.startswith("image_encoder.pattern.")}
        torch.save({"model": bundled, "encoder_kwargs": {}, "init_record": bundled_extra.get("init_record")},
                   tmp_path / "start.pt")
        start = tmp_path / "start.pt"
    else:
        start = BUNDLED_TINY_CHECKPOINT
    log = tmp_path / "run.log"
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(start), "--steps", "0", "--pattern-minutes", "0.1",
                              "--pattern-batch", "2", "--threads", "1", "--out", str(tmp_path / "p.pt"),
                              "--log", str(log)], capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "p.pt")
    assert extra["encoder_kwargs"]["pattern_offset"] == PATTERN[0][0]
    assert extra["pattern_pretrain"]["steps"] >= 1 and "patterns step 0" in log.read_text()
    head = [k for k in state if k.startswith("image_encoder.pattern.")]
    assert head and set(state) - set(head) == set(bundled)
    assert all(torch.equal(state[k], bundled[k]) for k in bundled if k.startswith("image_encoder."))  # codes kept
    sam = build_sam("tiny", tmp_path / "p.pt")
    assert sam.image_encoder.pattern is not None
    with torch.no_grad():
        image = preprocess(generate_scene(3).image)
        emb = sam.image_encoder(image)
        without = build_sam("tiny", start).image_encoder(image)  # what the rest of the encoder writes there
    channels = slice(PATTERN[0][0], PATTERN[2][-1] + 1)
    patterns = emb[0, channels] - without[0, channels]
    assert float(patterns.min()) >= -1e-5 and float(patterns.max()) < 1.0  # (0 until the head is sure)
    # The decoder reads them: its first upscaling conv takes each pattern channel (pattern_gates).
    up1 = sam.mask_decoder.output_upscaling[0].weight
    assert all(float(up1[c].abs().sum()) > 0 for level in PATTERN for c in level)


def test_train_tiny_adds_second_codes_to_given_weights_as_the_bundled_ones_have_them(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, build_sam, read_checkpoint
    from trimask.preprocess import preprocess
    from trimask.training.decoder_start import LOCAL_COLUMNS, READ_GAIN, SECOND, SECOND_FREQUENCY
    from trimask.training.scenes import generate_scene

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    assert bundled_extra["encoder_kwargs"]["second_offset"] == SECOND[0][0]
    # The bundled weights as they were before: no second codes or locality (the second layer's heads 1..4,
    # the upscaling's channels for them zero, token 1 reading the plain subpart mark, random positional
    # frequencies where SECOND's are 0, none where the locality's are).
    older = {k: v.clone() for k, v in bundled.items()}
    i2t = "mask_decoder.transformer.layers.1.cross_attn_image_to_token."
    for proj in ("q_proj", "k_proj", "v_proj"):
        older[i2t + proj + ".weight"][16:80] = 0
        older[i2t + proj + ".bias"][16:80] = 0
    older[i2t + "out_proj.weight"][:, 16:80] = 0
    older["mask_decoder.output_upscaling.0.weight"][:, 33:41] = 0
    older["mask_decoder.output_upscaling.3.weight"][:, 9:18] = 0
    older["mask_decoder.output_upscaling.3.bias"][9:18] = 0
    for k in range(1, 4):  # (token 0's reads were fitted after, stage 3c: laying second codes out keeps them)
        older[f"mask_decoder.output_hypernetworks_mlps.{k}.layers.2.bias"][9:18] = 0
    older["mask_decoder.output_hypernetworks_mlps.1.layers.2.bias"][0] = READ_GAIN
    pe = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    older[pe][:, list(SECOND_FREQUENCY)] = torch.randn(2, 32).half()
    older[pe][:, list(LOCAL_COLUMNS)] = 0
    kwargs = {k: v for k, v in bundled_extra["encoder_kwargs"].items() if k != "second_offset"}
    torch.save({"model": older, **bundled_extra, "encoder_kwargs": kwargs}, tmp_path / "older.pt")
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(tmp_path / "older.pt"), "--steps", "0", "--second-codes",
                              "--threads", "1", "--out", str(tmp_path / "s.pt")], capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "s.pt")
    assert extra["second_codes"] is True and extra["encoder_kwargs"]["second_offset"] == SECOND[0][0]
    assert set(state) == set(bundled)
    assert all(torch.allclose(state[k].float(), bundled[k].float(), atol=2e-3) for k in bundled)
    changed = [k for k in bundled if not torch.equal(older[k], bundled[k])]
    assert len(changed) >= 8
    with torch.no_grad():
        emb = build_sam("tiny", tmp_path / "s.pt").image_encoder(preprocess(generate_scene(3).image))
    assert float(emb[0, SECOND[0][0] : SECOND[2][-1] + 1].abs().sum()) > 0


def test_train_tiny_keeps_parts_within_wholes_and_trains_patterns_on_new_scenes(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint
    from trimask.training.decoder_start import READ_BIAS, UP_CONSTANT, UP_SECOND

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    # The bundled weights as they were before: the part candidate read alone.
    older = {k: v.clone() for k, v in bundled.items()}
    reader = "mask_decoder.output_hypernetworks_mlps.2.layers.2.bias"
    older[reader][[2, *UP_SECOND[2]]] = 0
    older[reader][UP_CONSTANT] = -READ_BIAS
    torch.save({"model": older, **bundled_extra}, tmp_path / "older.pt")
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(tmp_path / "older.pt"), "--steps", "0", "--part-in-whole",
                              "--pattern-minutes", "0.02", "--threads", "1", "--out", str(tmp_path / "p.pt")],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "p.pt")
    assert extra["part_in_whole"] is True
    assert torch.allclose(state[reader].float(), bundled[reader].float(), atol=2e-3)
    assert not torch.equal(older[reader], bundled[reader])
    # The pattern stage trained the head on from the scenes the chain of runs drew, and laid its gates out
    # afresh without touching the rest of the decoder (the locality reads ZREF in the same convolution).
    done, record = 0, bundled_extra
    while record:
        done += int((record.get("pattern_pretrain") or {}).get("scenes", 0))
        record = record.get("init_record")
    assert done > 0 and extra["pattern_pretrain"]["first_scene"] == done and extra["pattern_pretrain"]["steps"] >= 1
    head = [k for k in bundled if k.startswith("image_encoder.pattern.")]
    assert any(not torch.equal(state[k], bundled[k]) for k in head)
    assert all(torch.equal(state[k], bundled[k]) for k in bundled if k not in head and k != reader)


def test_train_tiny_lays_the_negative_marks_out_as_the_bundled_weights_have_them(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint
    from trimask.training.decoder_start import NEG_HEAD, UP_NEG

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    # The bundled weights without the negative marks: heads 5..7 of the second image->token attention and the
    # first upscaling's channels they write, zero.
    older = {k: v.clone() for k, v in bundled.items()}
    i2t = "mask_decoder.transformer.layers.1.cross_attn_image_to_token."
    heads = slice(16 * NEG_HEAD, 16 * (NEG_HEAD + 3))
    for name in ("q_proj", "k_proj", "v_proj"):
        older[i2t + name + ".weight"][heads] = 0
        older[i2t + name + ".bias"][heads] = 0
    older[i2t + "out_proj.weight"][:, heads] = 0
    older["mask_decoder.output_upscaling.0.weight"][:, UP_NEG[0] : UP_NEG[-1] + 2] = 0
    changed = [k for k in bundled if not torch.equal(older[k], bundled[k])]
    assert len(changed) >= 4
    torch.save({"model": older, **bundled_extra}, tmp_path / "older.pt")
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(tmp_path / "older.pt"), "--steps", "0", "--negative-marks",
                              "--threads", "1", "--out", str(tmp_path / "n.pt")],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "n.pt")
    assert extra["negative_marks"] is True
    assert all(torch.allclose(state[k].float(), bundled[k].float(), atol=2e-3) for k in bundled)


def test_train_tiny_fits_token0_on_given_weights_and_changes_nothing_else(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint

    bundled, _ = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    log = tmp_path / "run.log"
    subprocess.run(TRIMASK + ["train-tiny", "--init", str(BUNDLED_TINY_CHECKPOINT), "--steps", "0",
                              "--fit-single-scenes", "3", "--fit-single-steps", "4", "--threads", "1",
                              "--out", str(tmp_path / "f.pt"), "--log", str(log)],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "f.pt")
    fit = extra["single_fit"]
    assert fit["scenes"] >= 2 and fit["steps"] == 4 and fit["answers"] >= 12
    assert fit["held_out_loss"][1] <= fit["held_out_loss"][0]  # the start is a candidate: never worse held out
    assert "single-mask fit" in log.read_text()
    fitted = {"mask_decoder.output_upscaling.3.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"}
    assert set(state) == set(bundled)
    assert all(torch.equal(state[k], bundled[k]) for k in bundled if k not in fitted)


def test_train_tiny_refits_the_iou_head_of_given_weights_with_mark_strengths(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, build_sam, read_checkpoint
    from trimask.training.decoder_start import match_gains

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    # The bundled weights as they were before the IoU token gathered mark strengths (heads 0..3 of
    # the final attention zero).
    final = "mask_decoder.transformer.final_attn_token_to_image."
    strengths = [final + f"{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    older = dict(bundled)
    for k in strengths:
        older[k] = bundled[k].clone()
        if "out_proj" in k:
            older[k][:, :64] = 0
        else:
            older[k][:64] = 0
        assert not torch.equal(older[k], bundled[k])
    torch.save({"model": older, **bundled_extra}, tmp_path / "older.pt")
    log = tmp_path / "run.log"
    out = subprocess.run(TRIMASK + ["train-tiny", "--steps", "0", "--threads", "1", "--init", str(tmp_path / "older.pt"),
                                    "--mark-strengths", "--iou-fit-minutes", "0.05", "--out", str(tmp_path / "t.pt"),
                                    "--log", str(log)],
                         capture_output=True, text=True, check=True).stdout
    assert "no steps of SAM's objectives" in out
    state, extra = read_checkpoint(tmp_path / "t.pt")
    head = [k for k in bundled if k.startswith("mask_decoder.iou_prediction_head.")]
    # Everything but the IoU head and the strength heads is kept exactly; the strength heads are
    # laid out as in the bundled weights, and the IoU head is a new one.
    assert all(torch.equal(state[k], older[k]) for k in older if k not in head + strengths)
    assert all(torch.equal(state[k], bundled[k]) for k in strengths)
    assert any(not torch.equal(state[k], older[k]) for k in head)
    assert extra["mark_strengths"] is True and "train" not in extra
    assert extra["init_record"]["match_calibration"] == bundled_extra["match_calibration"]
    fit = extra["iou_fit"]
    assert fit["scenes"] >= 1 and fit["answers"] >= 5
    assert fit["mse_after"] <= fit["mse_before"]
    assert "iou head fitted" in log.read_text()
    assert match_gains(build_sam("tiny", tmp_path / "t.pt")) == match_gains(build_sam("tiny"))


@pytest.mark.parametrize("keep_trunk", [False, True])
def test_train_tiny_trains_the_codes_of_given_weights_on_new_scenes(tmp_path: Path, keep_trunk: bool):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, build_sam, read_checkpoint
    from trimask.training.decoder_start import match_gains

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    done, record = 0, bundled_extra
    while record:  # the code scenes every run behind the bundled weights used (a scene a step before batches)
        stage = record.get("code_pretrain") or {}
        done += stage.get("scenes", stage.get("steps", 0))
        record = record.get("init_record")
    assert done > 1000
    subprocess.run(TRIMASK + ["train-tiny", "--steps", "0", "--threads", "1", "--init", str(BUNDLED_TINY_CHECKPOINT),
                              "--code-pretrain-steps", "2", "--code-lr", "5e-4", "--calibrate-scenes", "3",
                              "--out", str(tmp_path / "t.pt"), *(["--code-keep-trunk"] if keep_trunk else [])],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "t.pt")
    # The codes go on from the scene after the last one the bundled weights saw, at the given rate.
    assert extra["code_pretrain"]["steps"] == 2 and extra["code_pretrain"]["first_scene"] == done
    assert extra["code_pretrain"]["lr"] == 5e-4
    assert extra["code_pretrain"]["keep_trunk"] is keep_trunk
    encoder = [k for k in bundled if k.startswith("image_encoder.")]
    trunk = [k for k in encoder if k.startswith(("image_encoder.stem.", "image_encoder.local_blocks."))]
    assert any(not torch.equal(state[k], bundled[k]) for k in set(encoder) - set(trunk))
    # The trunk, which the pattern head reads, learns too unless it is kept; the pattern head never does.
    assert all(torch.equal(state[k], bundled[k]) for k in trunk) is keep_trunk
    assert all(torch.equal(state[k], bundled[k]) for k in encoder if k.startswith("image_encoder.pattern."))
    # The decoder's layout is kept but for the match thresholds, which are chosen anew.
    calibration = extra["match_calibration"]
    assert match_gains(build_sam("tiny", tmp_path / "t.pt")) == pytest.approx(tuple(calibration["gains"]), abs=2e-3)
    # (the thresholds: the first layer's sink biases, and the second layer's, for the second codes)
    sinks = ("mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj.bias",
             "mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight")
    assert all(torch.equal(state[k], bundled[k]) for k in bundled
               if k.startswith(("mask_decoder.", "prompt_encoder.")) and k not in sinks)
    assert extra["init_record"]["code_pretrain"] == bundled_extra["code_pretrain"]


def test_train_tiny_keep_trunk_trains_only_the_code_path_through_the_kept_decoder(tmp_path: Path):
    import torch

    from trimask.commands.train import FROZEN_DECODER, TRUNK
    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint

    bundled, _ = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    subprocess.run(TRIMASK + ["train-tiny", "--steps", "2", "--threads", "1", "--init", str(BUNDLED_TINY_CHECKPOINT),
                              "--freeze-decoder", "--keep-trunk", "--coarse-fraction", "0", "--level-curriculum", "0",
                              "0", "--lr", "1e-3", "--focal-weight", "1", "--code-loss-weight", "1",
                              "--out", str(tmp_path / "t.pt")], capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "t.pt")
    assert extra["train"]["steps_done"] == 2 and set(TRUNK) <= set(extra["train"]["frozen"])
    kept = [k for k in bundled if k.startswith(TRUNK + FROZEN_DECODER)]
    assert any(k.startswith("image_encoder.pattern.") for k in kept)
    assert all(torch.equal(state[k], bundled[k]) for k in kept)
    # The code path (context, fuse, neck) learns, and so do the IoU token and head.
    path = [k for k in bundled if k.startswith(("image_encoder.neck.", "image_encoder.fuse.", "image_encoder.context_blocks."))]
    assert any(not torch.equal(state[k], bundled[k]) for k in path)
    assert any(not torch.equal(state[k], bundled[k]) for k in bundled if k.startswith("mask_decoder.iou_prediction_head."))


def test_train_tiny_code_path_trains_only_the_code_path_and_records_its_scenes(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint
    from trimask.training.code_path import CODE_PATH

    from trimask.commands.train import _stage_scenes

    bundled, bundled_extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    subprocess.run(TRIMASK + ["train-tiny", "--steps", "0", "--threads", "1", "--init", str(BUNDLED_TINY_CHECKPOINT),
                              "--code-path-steps", "2", "--code-path-lr", "1e-3", "--code-path-levels", "3", "1", "1",
                              "--code-path-code-dims", "15", "--out", str(tmp_path / "t.pt")],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "t.pt")
    record = extra["code_path"]
    # The bundled weights were made with this stage: it goes on after the scenes their runs drew.
    assert _stage_scenes(bundled_extra, "code_path") > 0
    assert record["steps"] == 2 and record["scenes"] >= 2 and record["first_scene"] == _stage_scenes(bundled_extra, "code_path")
    assert list(record["config"]["level_weights"]) == [3.0, 1.0, 1.0] and record["config"]["code_dims"] == 15
    path = [k for k in bundled if k.startswith(CODE_PATH)]
    assert any(not torch.equal(state[k], bundled[k]) for k in path)
    # The trunk, the pattern head and the whole decoder (the IoU head included) are bit for bit as they were.
    rest = [k for k in bundled if not k.startswith(CODE_PATH)]
    assert any(k.startswith("image_encoder.pattern.") for k in rest)
    assert all(torch.equal(state[k], bundled[k]) for k in rest)
    # Training on from these weights draws the scenes after them.
    assert _stage_scenes({"code_path": record, "init_record": {"code_path": {"scenes": 5}}}, "code_path") == \
        record["scenes"] + 5


def test_iou_fit_scenes_fits_a_fresh_head_on_exactly_that_many_scenes(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint

    bundled, _ = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    subprocess.run(TRIMASK + ["train-tiny", "--steps", "0", "--threads", "1", "--init", str(BUNDLED_TINY_CHECKPOINT),
                              "--iou-fit-scenes", "2", "--out", str(tmp_path / "t.pt")],
                   capture_output=True, text=True, check=True)
    state, extra = read_checkpoint(tmp_path / "t.pt")
    assert extra["iou_fit"]["scenes"] == 2 and extra["iou_fit"]["answers"] >= 2
    head = [k for k in bundled if k.startswith("mask_decoder.iou_prediction_head.")]
    assert any(not torch.equal(state[k], bundled[k]) for k in head)
    assert all(torch.equal(state[k], bundled[k]) for k in bundled if k not in head)


def test_codes_go_on_after_every_scene_of_batched_and_older_runs():
    from trimask.commands.train import _code_scenes_done

    # A run of 3 steps of 2 scenes on weights made by a run from before --code-batch: 5 steps, a scene each.
    record = {"code_match_start": True, "code_pretrain": {"steps": 3, "scenes": 6, "batch": 2},
              "init_record": {"code_match_start": True, "code_pretrain": {"steps": 5}}}
    assert _code_scenes_done(Path("w.pt"), record) == 11


def test_train_tiny_refuses_codes_for_weights_without_the_code_match_layout(tmp_path: Path):
    import torch

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint

    state, extra = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    torch.save({"model": state, "encoder_kwargs": extra.get("encoder_kwargs") or {}, "code_match_start": False},
               tmp_path / "plain.pt")
    line = _one_line_error(["train-tiny", "--steps", "0", "--init", str(tmp_path / "plain.pt"),
                            "--code-pretrain-steps", "2", "--out", str(tmp_path / "t.pt")])
    assert "--code-match-start" in line and "plain.pt" in line
    assert not (tmp_path / "t.pt").exists()


def test_code_pretrain_minutes_alone_run_until_the_time_limit(tmp_path: Path):
    from trimask.models.build import read_checkpoint

    subprocess.run(TRIMASK + ["train-tiny", "--steps", "1", "--coarse-fraction", "1",
                              "--level-curriculum", "0", "0", "--threads", "1", "--code-match-start",
                              "--code-pretrain-minutes", "0.05", "--out", str(tmp_path / "t.pt")],
                   capture_output=True, text=True, check=True)
    _, extra = read_checkpoint(tmp_path / "t.pt")
    assert extra["code_pretrain"]["steps"] >= 1
    assert 3 <= extra["code_pretrain"]["seconds"] < 30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("command", [["train-tiny", "--steps", "1"],
                                     ["finetune", "--model", "tiny", "--coco", "x.json", "--images", "."]])
def test_training_on_a_missing_gpu_is_one_line(tmp_path: Path, command: list[str]):
    line = _one_line_error([*command, "--out", str(tmp_path / "t.pt"), "--device", "cuda"])
    assert "CUDA" in line
    assert not (tmp_path / "t.pt").exists()
