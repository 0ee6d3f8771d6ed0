"""``trimask train-tiny``, ``trimask eval`` and ``trimask finetune``: the model-training commands."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from trimask.errors import TrimaskError

DEFAULT_TINY_OUT = Path(__file__).resolve().parent.parent / "weights" / "tiny.pt"
FROZEN_DECODER = ("prompt_encoder.", "mask_decoder.transformer.", "mask_decoder.output_upscaling.",
                  "mask_decoder.output_hypernetworks_mlps.", "mask_decoder.mask_tokens.")
TRUNK = ("image_encoder.stem.", "image_encoder.local_blocks.", "image_encoder.pattern.")  # what the patterns read
CODE_PATH_SCENE_OFFSET = 3_000_000  # scenes of SAM's objectives on the code path (--code-path-steps/-minutes)
CODE_SCENE_OFFSET = 5_000_000  # code pre-training scenes: seeds base + this + i, apart from the main run's
PATTERN_SCENE_OFFSET = 7_000_000  # the pattern head's scenes (--pattern-minutes)
READ_CALIBRATION_SCENE_OFFSET = 6_000_000  # scenes that choose token 0's reads (--calibrate-reads)
CALIBRATION_SCENE_OFFSET = 8_000_000  # scenes that choose the match thresholds (--calibrate-scenes)
IOU_FIT_SCENE_OFFSET = 9_000_000  # scenes whose answers the IoU head is fitted on (--iou-fit-minutes)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-tiny",
        help="train the embedded tiny model on generated scenes (SAM's objectives)",
        description="Train the embedded 'tiny' SAM from scratch (or from --init weights) on procedurally generated "
        "whole/part/subpart scenes with SAM's losses and simulated interactive prompting, on the CPU or a CUDA GPU. "
        "Deterministic for a given --seed and --steps (up to floating-point non-determinism of the kernels).",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (scene stream and initialization), 0..99")
    p.add_argument("--out", type=Path, default=DEFAULT_TINY_OUT, help="checkpoint to write (fp16, rewritten periodically)")
    p.add_argument("--steps", type=int, default=650,
                   help="optimizer steps of SAM's objectives (0: none, e.g. when --iou-fit-minutes fits the IoU head)")
    p.add_argument("--coarse-fraction", type=float, default=0.8,
                   help="fraction of steps at the coarse 32x32 decoder grid (progressive resolution)")
    p.add_argument("--window-fraction", type=float, default=0.0,
                   help="fraction of steps (after the coarse ones) at which each prompt's decoder sees only a "
                   "window of the full-resolution embedding around its object (default 0: none)")
    p.add_argument("--window-cells", type=int, default=32,
                   help="side of those windows in embedding cells, 8..64 (default 32: a quarter of the decoder's cost)")
    p.add_argument("--focal-ramp", type=float, nargs=2, default=(0.0, 0.0), metavar=("FROM", "TO"),
                   help="raise the focal weight from 0 to SAM's 20 between these fractions of the run "
                   "(default 0 0: SAM's objective throughout)")
    p.add_argument("--focal-weight", type=float, default=20.0,
                   help="weight of the focal term against dice (default 20, SAM's)")
    p.add_argument("--level-curriculum", type=float, nargs=2, default=(0.1, 0.25), metavar=("WHOLE", "PART"),
                   help="train on wholes only until the first fraction of the run, on parts and wholes until "
                   "the second, then on the full subpart/part/whole hierarchy (default 0.1 0.25; 0 0: full "
                   "hierarchy throughout)")
    p.add_argument("--similarity-init", action="store_true",
                   help="start each image->token attention as a similarity match (shared orthonormal query/key "
                   "map): the decoder learns to follow a click about twice as fast from scratch")
    p.add_argument("--code-match-start", action="store_true",
                   help="start the prompt encoder and mask decoder from the built code-match layout (a click is "
                   "answered by matching per-level region codes the encoder writes; see the model card) instead "
                   "of random weights")
    p.add_argument("--code-pretrain-steps", type=int, default=0,
                   help="with --code-match-start (or --init weights made with it, to train their codes on from "
                   "the scenes they stopped at): first train the encoder alone to write those region codes "
                   "for up to this many steps of --code-batch scenes (default 0: none)")
    p.add_argument("--code-pretrain-minutes", type=float, default=None,
                   help="stop that pre-training after this many minutes (on top of --minutes; alone, it sets "
                   "no step limit)")
    p.add_argument("--code-lr", type=float, default=2e-3,
                   help="peak learning rate of the code pre-training (default 2e-3; lower to go on training "
                   "--init codes)")
    p.add_argument("--code-batch", type=int, default=1,
                   help="scenes per step of the code pre-training (default 1; more on a GPU, which one scene "
                   "leaves idle)")
    p.add_argument("--code-workers", type=int, default=0,
                   help="processes that make the code pre-training's (and the pattern head's) scenes (default 0: the training process "
                   "itself; on a GPU, about the CPU cores less one)")
    p.add_argument("--code-keep-trunk", action="store_true",
                   help="in the code pre-training, train only the encoder's context path, fuse and neck: the trunk "
                   "(stem and local blocks), which an --init pattern head reads, stays as it is, so its patterns do too")
    p.add_argument("--pattern-minutes", type=float, default=0.0,
                   help="with --code-match-start (or --init weights made with it): after code pre-training, train the "
                   "encoder's pattern head (which of a cell's 4 x 4 pixels lie outside its region, so masks follow edges "
                   "inside a cell) for this many minutes, the rest of the encoder frozen (default 0: none)")
    p.add_argument("--pattern-batch", type=int, default=4, help="scenes per step of the pattern head (default 4)")
    p.add_argument("--code-path-steps", type=int, default=0,
                   help="with --code-match-start (or --init weights made with it): after the pattern head, train the "
                   "encoder's code path (context, fuse, neck; not the trunk, the pattern head or the decoder) with "
                   "SAM's mask loss through the laid-out decoder for up to this many steps (a scene each): each first click's "
                   "three candidates on its subpart, part and whole, a box and a second click (default 0: none)")
    p.add_argument("--code-path-minutes", type=float, default=None,
                   help="stop that stage after this many minutes (alone, it sets no step limit)")
    p.add_argument("--code-path-lr", type=float, default=2e-4, help="its peak learning rate (default 2e-4)")
    p.add_argument("--code-path-levels", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SUB", "PART", "WHOLE"),
                   help="its weights of the first click's subpart, part and whole candidates (default 1 1 1)")
    p.add_argument("--code-path-logit-scale", type=float, default=4.0,
                   help="its losses see the logits times this (the layout's are soft, so unsharpened, the soft dice of "
                   "a small region hardly follows its IoU; default 4)")
    p.add_argument("--code-path-rounds", type=int, default=1,
                   help="its corrective clicks after the first, each at the largest error of the answer before it "
                   "(default 1: the second click; 4 follows the 5-click protocol)")
    p.add_argument("--code-path-code-dims", type=int, default=16, choices=(15, 16),
                   help="the code channels its region-code loss compares: 16 (default, as the code pre-training) or "
                   "15, the ones the decoder's comparison heads read")
    p.add_argument("--second-codes", action="store_true",
                   help="with a pattern head (--pattern-minutes, or --init weights that have one): the encoder also "
                   "writes each cell's second codes (its neighbour's codes towards the pixels its pattern calls "
                   "outside; computed, not trained) and the decoder marks those pixels by them, so a region that "
                   "only reaches into a cell is marked there too; and the subpart candidate is switched off far "
                   "from the clicks (a broad positional kernel around each click)")
    p.add_argument("--part-in-whole", action="store_true",
                   help="with --code-match-start (or --init weights made with it): the part candidate also needs the "
                   "clicked whole's mark (it reads the whole's marks too, against a higher bias), so it no longer "
                   "spills onto parts of other objects that match its code; laid out, not trained")
    p.add_argument("--negative-marks", action="store_true",
                   help="with --code-match-start (or --init weights made with it): the decoder also marks, per level, "
                   "the cells whose codes match a negative click's (the negative clicks alone), for the single-mask "
                   "fit's hidden units (--fit-single-scenes): a cell matched by a positive and a negative click is then "
                   "told from one matched by none; laid out, nothing else changes until that fit")
    p.add_argument("--calibrate-cut-scenes", type=int, default=0,
                   help="with a pattern head: after the code path, choose where the head cuts (the logit above which "
                   "a pixel is written as outside its cell's region) on this many uncropped training scenes, the "
                   "match thresholds' scenes: the cut at which the first click's candidates fit their levels best; "
                   "recorded in the checkpoint (default 0: keep the --init weights' cut, or 2)")
    p.add_argument("--calibrate-scenes", type=int, default=0,
                   help="with --code-match-start (or --init weights made with it): after code pre-training, choose "
                   "each level's match threshold (the sink logit of its comparison head) on this many uncropped "
                   "training scenes: the loosest one whose candidate fits that level within 0.01 of the best "
                   "(default 0: keep the start's)")
    p.add_argument("--calibrate-reads", type=int, default=0,
                   help="with --code-match-start (or --init weights made with it): after the match thresholds, choose "
                   "what the single-mask output reads (the previous answer, each level's clicked region, the box) "
                   "on this many uncropped training scenes, by the standard click protocol and tight boxes "
                   "(default 0: keep the start's)")
    p.add_argument("--fit-single-scenes", type=int, default=0,
                   help="after the reads (code-match layout): fit hidden units of the last upscaling, and what the "
                   "single-mask output reads, to its answers to clicks 2..5 of the standard protocol on this many "
                   "uncropped training scenes with SAM's mask loss, so that corrective clicks follow a learned, "
                   "nonlinear rule; a box alone is answered as before (default 0: keep the rule as it is)")
    p.add_argument("--fit-single-steps", type=int, default=2000,
                   help="optimizer steps of that fit, batches of 8 answers (default 2000)")
    p.add_argument("--iou-fit-minutes", type=float, default=0.0,
                   help="last stage: answer simulated prompts on training scenes for this many minutes with the model "
                   "as it is, then fit a fresh IoU head to the actual IoU of each answer (SAM's IoU MSE on the "
                   "frozen IoU token's states; a held-out fifth picks the stopping step); default 0: none")
    p.add_argument("--iou-fit-scenes", type=int, default=0,
                   help="answer prompts on at most this many scenes for that fit (with --iou-fit-minutes, whichever "
                   "ends first; alone, no time limit): the same scenes, so the same head, on any machine")
    p.add_argument("--mark-strengths", action="store_true",
                   help="with --init weights of the code-match layout made before its IoU token gathered each mark's "
                   "strength (heads 0..3 of the final attention): lay those heads out (the masks do not change); "
                   "then fit the IoU head to them with --iou-fit-minutes")
    p.add_argument("--code-loss-weight", type=float, default=0.0,
                   help="add the region-code loss on the encoder's embedding to SAM's objectives with this weight "
                   "(keeps a code-match start's codes apart while SAM's loss trains; default 0)")
    p.add_argument("--freeze-decoder", action="store_true",
                   help="keep the prompt encoder and the mask decoder's transformer, upscaling, hypernetworks and "
                   "mask tokens as they start; train the image encoder, the IoU token and the IoU head")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="keep the image encoder as it is (after any code pre-training); with --freeze-decoder only "
                   "the IoU token and the IoU head learn: how to rank a built start's candidates")
    p.add_argument("--keep-trunk", action="store_true",
                   help="with --freeze-decoder: also keep the encoder's trunk (stem and local blocks) and its pattern "
                   "head, so SAM's objectives train only the code path (context, fuse, neck) through the laid-out "
                   "decoder, and the IoU token and head; the patterns an --init checkpoint has stay valid")
    p.add_argument("--fixed-levels", action="store_true",
                   help="train multimask candidate 1 / 2 / 3 on the clicked subpart / part / whole, not on the "
                   "assignment of the three with the least loss (the code-match layout's tokens read one level each)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these tiny weights (e.g. the bundled ones, to train them longer) instead of a "
                   "random init; pass --level-curriculum 0 0, as the model already answers every level")
    p.add_argument("--images-per-step", type=int, default=1, help="scenes per optimizer step (default 1)")
    p.add_argument("--rounds", type=int, default=2,
                   help="simulated interaction rounds per prompt: the first prompt, then clicks on the previous "
                   "prediction's errors with its logits as mask input (default 2; SAM uses 11)")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine decay; default 1e-3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train (default: auto, CUDA when present; scenes are made on the CPU)")
    p.add_argument("--log", type=Path, default=None, help="also append progress lines to this file")
    p.set_defaults(func=run_train_tiny)

    e = subparsers.add_parser(
        "eval",
        help="evaluate a model on held-out generated scenes",
        description="Single clicks at subparts of held-out generated scenes: best-of-three IoU per level, "
        "IoU of the candidate ranked first, area ordering, and mIoU after 1/3/5 clicks (standard protocol).",
    )
    e.add_argument("--model", default="tiny", help="model type (tiny, vit_b, ...)")
    e.add_argument("--checkpoint", type=Path, default=None, help="weights to evaluate (tiny: the bundled ones when omitted)")
    e.add_argument("--scenes", type=int, default=100, help="number of held-out generated scenes (default 100)")
    e.add_argument("--seed", type=int, default=0, help="offset into the held-out seed range")
    e.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    e.add_argument("--regions", choices=("clicked", "all"), default=None,
                   help="measure the answers to clicks as the browser shows them: 'clicked' keeps only the connected "
                   "regions that hold a positive click, 'all' the decoder's masks as they are (default: the browser's "
                   "default for the model, clicked for tiny, all for the others)")
    e.add_argument("--edges", choices=("snap", "off"), default=None,
                   help="measure every answer as the browser shows it: 'snap' moves its edges onto the image's colour "
                   "edges (a guided filter), 'off' keeps the decoder's (default: the browser's default for the model, "
                   "snap for tiny, off for the others)")
    e.set_defaults(func=run_eval)

    f = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a COCO annotation file",
        description="Fine-tune a model on COCO instance masks with SAM's objectives and simulated prompting; "
        "writes a checkpoint build_sam loads. Official SAM: the mask decoder (and with --train-encoder the image "
        "encoder). The embedded tiny model, whose decoder is laid out by hand: its encoder's code path, through "
        "the decoder as it is (--recipe).",
    )
    f.add_argument("--model", required=True, help="model type (tiny, vit_b, ...)")
    f.add_argument("--checkpoint", type=Path, default=None, help="starting weights (tiny: bundled when omitted)")
    f.add_argument("--coco", type=Path, required=True, help="COCO instance-segmentation JSON")
    f.add_argument("--images", type=Path, required=True, help="folder holding the COCO file's images")
    f.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    f.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--seed", type=int, default=0, help="seed for prompt sampling and order (default 0)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train (default: auto, CUDA when present)")
    f.add_argument("--train-encoder", action="store_true", help="also train the image encoder (--recipe sam)")
    f.add_argument("--focal-weight", type=float, default=None,
                   help="weight of the focal term against dice (default: the recipe's, SAM's 20 or the code path's 1; "
                   "0 = dice alone)")
    f.add_argument("--recipe", default="auto", choices=("auto", "sam", "code-path"),
                   help="sam: the decoder learns (SAM's recipe); code-path: the tiny encoder's code path learns through "
                   "the laid-out decoder (logits x 4, no IoU loss); auto (default): code-path for a checkpoint made "
                   "from the code-match layout, such as the bundled tiny, else sam")
    f.set_defaults(func=run_finetune)


def _threads(n: int | None) -> None:
    import os

    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def run_train_tiny(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from trimask.models.build import build_sam, build_sam_and_extra
    from trimask.training.code_pretrain import prepare_encoder, pretrain_codes
    from trimask.training.decoder_start import code_match_start, pattern_gates
    from trimask.training.scenes import TRAIN_SEED_STRIDE, generate_scene
    from trimask.training.trainer import TrainConfig, save_checkpoint, scene_to_sample, similarity_init, train

    if not 0 <= args.seed < 100:
        raise TrimaskError("--seed must be between 0 and 99 so training scenes stay apart from the held-out ones.")
    if args.steps < 0:
        raise TrimaskError("--steps must be 0 or more.")
    if args.iou_fit_minutes < 0 or args.iou_fit_scenes < 0:
        raise TrimaskError("--iou-fit-minutes and --iou-fit-scenes must be 0 or more.")
    if args.mark_strengths and args.init is None:
        raise TrimaskError("--mark-strengths adds to --init weights (--code-match-start lays the heads out itself); "
                           "pass --init.")
    if not 8 <= args.window_cells <= 64:
        raise TrimaskError("--window-cells must be between 8 and 64 (the embedding is 64 x 64 cells).")
    if not (0.0 <= args.window_fraction <= 1.0 and 0.0 <= args.coarse_fraction <= 1.0):
        raise TrimaskError("--coarse-fraction and --window-fraction must be between 0 and 1.")
    if args.init is not None and args.similarity_init:
        raise TrimaskError("--similarity-init starts a decoder from scratch; it cannot be combined with --init.")
    if args.code_match_start and (args.init is not None or args.similarity_init):
        raise TrimaskError("--code-match-start sets the decoder's start itself; drop --init and --similarity-init.")
    if args.code_loss_weight < 0:
        raise TrimaskError("--code-loss-weight must be 0 or more.")
    if args.keep_trunk and not (args.freeze_decoder and args.steps and not args.freeze_encoder):
        raise TrimaskError("--keep-trunk is for SAM's objectives on the encoder through a kept decoder; pass --steps "
                           "and --freeze-decoder, without --freeze-encoder.")
    if args.freeze_encoder and args.code_loss_weight:
        raise TrimaskError("--code-loss-weight trains the encoder; it cannot be combined with --freeze-encoder.")
    if args.code_pretrain_steps < 0:
        raise TrimaskError("--code-pretrain-steps must be 0 or more.")
    if args.code_lr <= 0:
        raise TrimaskError("--code-lr must be above 0.")
    if args.code_batch < 1 or args.code_workers < 0:
        raise TrimaskError("--code-batch must be 1 or more and --code-workers 0 or more.")
    if args.code_keep_trunk and not (args.code_pretrain_steps or args.code_pretrain_minutes):
        raise TrimaskError("--code-keep-trunk is for the code pre-training; pass --code-pretrain-steps or "
                           "--code-pretrain-minutes.")
    if args.code_path_steps < 0 or (args.code_path_minutes is not None and args.code_path_minutes <= 0):
        raise TrimaskError("--code-path-steps must be 0 or more and --code-path-minutes above 0.")
    if args.code_path_lr <= 0 or args.code_path_logit_scale <= 0:
        raise TrimaskError("--code-path-lr and --code-path-logit-scale must be above 0.")
    if min(args.code_path_levels) < 0 or not any(args.code_path_levels):
        raise TrimaskError("--code-path-levels must be 0 or more, not all 0.")
    if args.code_path_rounds < 0:
        raise TrimaskError("--code-path-rounds must be 0 or more.")
    if (args.calibrate_scenes < 0 or args.calibrate_reads < 0 or args.fit_single_scenes < 0
            or args.calibrate_cut_scenes < 0):
        raise TrimaskError("--calibrate-cut-scenes, --calibrate-scenes, --calibrate-reads and --fit-single-scenes must "
                           "be 0 or more.")
    if args.fit_single_steps < 1:
        raise TrimaskError("--fit-single-steps must be 1 or more.")
    if args.second_codes and args.init is None and not args.code_match_start:
        raise TrimaskError("--second-codes works on the code-match layout; pass --code-match-start, or --init weights "
                           "made with it.")
    for flag, on in (("--part-in-whole", args.part_in_whole), ("--negative-marks", args.negative_marks)):
        if on and args.init is None and not args.code_match_start:
            raise TrimaskError(f"{flag} works on the code-match layout; pass --code-match-start, or --init weights "
                               "made with it.")
    if args.pattern_minutes < 0 or args.pattern_batch < 1:
        raise TrimaskError("--pattern-minutes must be 0 or more and --pattern-batch 1 or more.")
    code_path = bool(args.code_path_steps or args.code_path_minutes)
    code_stages = bool(args.code_pretrain_steps or args.code_pretrain_minutes or args.calibrate_scenes
                       or args.pattern_minutes or args.calibrate_reads or args.fit_single_scenes or code_path)
    if code_stages and not args.code_match_start and args.init is None:
        raise TrimaskError("--code-pretrain-steps, --code-pretrain-minutes, --pattern-minutes, --code-path-steps, "
                           "--code-path-minutes, --calibrate-scenes, --calibrate-reads and --fit-single-scenes work on "
                           "the code-match layout; pass --code-match-start, or --init weights made with it.")
    _threads(args.threads)
    import torch

    from trimask.embedder import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    encoder_kwargs: dict = {}
    init_extra: dict = {}
    code_scenes_done = 0  # code pre-training scenes the --init weights were made with
    if args.init is not None:
        sam, init_extra = build_sam_and_extra("tiny", args.init)
        encoder_kwargs = init_extra.get("encoder_kwargs") or {}
        if code_stages:
            code_scenes_done = _code_scenes_done(args.init, init_extra)
        if args.pattern_minutes and "pattern_offset" not in encoder_kwargs:
            sam, encoder_kwargs = _with_pattern_head(sam, encoder_kwargs)
    else:
        sam = build_sam("tiny", random_init=True)
        if args.pattern_minutes:
            sam, encoder_kwargs = _with_pattern_head(sam, encoder_kwargs)
        _reinit(sam)  # a fresh seeded init (build_sam's random init is fixed; the run seed decides this one)
    if args.mark_strengths:
        from trimask.training.decoder_start import mark_strengths

        mark_strengths(sam)
    if args.similarity_init:
        similarity_init(sam)
    if args.code_match_start:
        code_match_start(sam)
        prepare_encoder(sam.image_encoder)
    if args.second_codes:
        if "pattern_offset" not in encoder_kwargs:
            raise TrimaskError("--second-codes needs a pattern head: pass --pattern-minutes, or --init weights that "
                               "have one.")
        sam, encoder_kwargs = _with_second_codes(sam, encoder_kwargs)
    if args.calibrate_cut_scenes and "pattern_offset" not in encoder_kwargs:
        raise TrimaskError("--calibrate-cut-scenes needs a pattern head: pass --pattern-minutes, or --init weights "
                           "that have one.")
    if args.part_in_whole:
        from trimask.training.decoder_start import part_within_whole

        part_within_whole(sam)
    if args.negative_marks:
        from trimask.training.decoder_start import negative_marks

        negative_marks(sam)
    sam.to(device)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, lr=args.lr, prompts_per_image=4, rounds=args.rounds,
                      images_per_step=args.images_per_step,
                      coarse_steps=int(args.steps * args.coarse_fraction), warmup_steps=min(150, args.steps),
                      window_steps=int(args.steps * args.window_fraction), window_cells=args.window_cells,
                      focal_ramp=tuple(args.focal_ramp), focal_weight=args.focal_weight, level_curriculum=tuple(args.level_curriculum),
                      code_loss_weight=args.code_loss_weight, frozen=(FROZEN_DECODER + (TRUNK if args.keep_trunk else ())
                              if args.freeze_decoder else ()),
                      train_encoder=not args.freeze_encoder, fixed_levels=args.fixed_levels)
    base = args.seed * TRAIN_SEED_STRIDE

    def samples(i: int, rng: np.random.Generator):
        return scene_to_sample(generate_scene(base + i, varied_aspect=True), rng, n_groups=cfg.prompts_per_image)

    log_file = open(args.log, "a") if args.log else None

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stderr)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    code_summary = None
    if args.code_pretrain_steps or args.code_pretrain_minutes:
        trunk = [p for name, p in sam.named_parameters() if name.startswith(TRUNK)]
        if args.code_keep_trunk:
            for p in trunk:
                p.requires_grad_(False)
        with tqdm(total=args.code_pretrain_steps or None, desc="codes", unit="step", file=sys.stderr) as bar:
            code_summary = pretrain_codes(
                sam.image_encoder,
                functools.partial(_code_scene, base + CODE_SCENE_OFFSET + code_scenes_done),
                steps=args.code_pretrain_steps or 10**9,  # minutes alone: the time limit ends it
                seed=args.seed, lr=args.code_lr, batch=args.code_batch, workers=args.code_workers,
                log=log, progress=bar.update,
                max_seconds=args.code_pretrain_minutes * 60 if args.code_pretrain_minutes else None)
        for p in trunk:
            p.requires_grad_(True)
        code_summary = {**code_summary, "first_scene": code_scenes_done, "lr": args.code_lr,
                        "keep_trunk": args.code_keep_trunk}
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in code_summary.items()}))
    pattern_summary = None
    if args.pattern_minutes:
        from trimask.training.pattern_pretrain import pretrain_patterns

        pattern_gates(sam)  # weights made before the patterns lack the gates; a code-match start has them
        pattern_scenes_done = _stage_scenes(init_extra, "pattern_pretrain")  # --init's head trains on new scenes
        with tqdm(desc="patterns", unit="step", file=sys.stderr) as bar:
            pattern_summary = pretrain_patterns(
                sam.image_encoder, functools.partial(_code_scene, base + PATTERN_SCENE_OFFSET + pattern_scenes_done),
                steps=10**9, seed=args.seed, batch=args.pattern_batch, workers=args.code_workers,
                max_seconds=args.pattern_minutes * 60, log=log, progress=bar.update)
        pattern_summary = {**pattern_summary, "first_scene": pattern_scenes_done}
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in pattern_summary.items()}))
    path_summary = None
    if code_path:
        path_summary = _train_code_path(sam, base + CODE_PATH_SCENE_OFFSET, _stage_scenes(init_extra, "code_path"),
                                        args, log)
    cut = None
    if args.calibrate_cut_scenes:
        from trimask.training.cut_calibration import calibrate_cut

        try:
            cut = calibrate_cut(sam, (generate_scene(base + CALIBRATION_SCENE_OFFSET + i)
                                      for i in range(args.calibrate_cut_scenes)), seed=args.seed)
        except ValueError as exc:
            raise TrimaskError(f"--calibrate-cut-scenes {args.calibrate_cut_scenes}: {exc}; use more scenes.") from exc
        encoder_kwargs = {**encoder_kwargs, "pattern_cut": cut["cut"]}
        log(f"pattern cut: {cut['cut']} on {cut['clicks']} clicks (mean IoU by cut {cut['mean_iou']})")
    calibration = None
    if args.calibrate_scenes:
        from trimask.training.match_calibration import calibrate_match

        calib_base = base + CALIBRATION_SCENE_OFFSET
        try:
            calibration = calibrate_match(
                sam, (generate_scene(calib_base + i) for i in range(args.calibrate_scenes)),  # uncropped, as eval
                seed=args.seed)
        except ValueError as exc:
            raise TrimaskError(f"--calibrate-scenes {args.calibrate_scenes}: {exc}; use more scenes.") from exc
        log(f"match thresholds (sink logits, subpart / part / whole): {calibration['gains']} "
            f"on {calibration['clicks']} clicks")
    reads = None
    if args.calibrate_reads:
        from trimask.training.read_calibration import calibrate_reads

        reads_base = base + READ_CALIBRATION_SCENE_OFFSET
        try:
            with tqdm(desc="reads (scenes, then settings)", file=sys.stderr) as bar:
                reads = calibrate_reads(sam, (generate_scene(reads_base + i) for i in range(args.calibrate_reads)),
                                        seed=args.seed, progress=bar.update)
        except ValueError as exc:
            raise TrimaskError(f"--calibrate-reads {args.calibrate_reads}: {exc}; use more scenes.") from exc
        log(f"single-mask reads: {reads['reads']} (mean IoU {reads['start_iou']['mean']:.4f} -> "
            f"{reads['iou']['mean']:.4f} on {reads['targets']} targets, {reads['settings']} settings)")
    single = None
    if args.fit_single_scenes:
        single = _fit_single(sam, base + READ_CALIBRATION_SCENE_OFFSET, args, log)
    extra = {"encoder_kwargs": encoder_kwargs, "similarity_init": args.similarity_init,
             "init": str(args.init) if args.init is not None else None,
             "init_record": init_extra if args.init is not None else None,  # how the starting weights were made
             "mark_strengths": args.mark_strengths, "second_codes": args.second_codes,
             "part_in_whole": args.part_in_whole, "negative_marks": args.negative_marks,
             "code_match_start": args.code_match_start, "code_pretrain": code_summary,
             "pattern_pretrain": pattern_summary, "code_path": path_summary,
             "cut_calibration": cut, "match_calibration": calibration, "read_calibration": reads,
             "single_fit": single}
    summary = None
    if cfg.steps:
        with tqdm(total=cfg.steps, desc="train-tiny", unit="step", file=sys.stderr) as bar:
            summary = train(sam, cfg, samples, out=args.out, extra=extra, log=log,
                            progress=bar.update, max_seconds=args.minutes * 60 if args.minutes else None)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
        extra = {**extra, "train": summary["record"]}
    iou_fit = bool(args.iou_fit_minutes or args.iou_fit_scenes)
    if iou_fit:
        extra = {**extra, "iou_fit": _fit_iou_head(sam, base + IOU_FIT_SCENE_OFFSET, args, log)}
    if summary is None or iou_fit:
        save_checkpoint(sam, args.out, extra)
    done = f"{summary['steps']} steps in {summary['seconds'] / 60:.1f} min" if summary else "no steps of SAM's objectives"
    print(f"wrote {args.out} after {done}")
    return 0


def _reinit(module) -> None:
    """Draw every submodule's parameters of ``module`` afresh from torch's current random state."""
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def _with_pattern_head(sam, encoder_kwargs: dict):
    """``sam`` rebuilt with a (fresh) pattern head on its encoder, every other weight kept."""
    from trimask.models.build import construct_sam
    from trimask.training.decoder_start import PATTERN

    kwargs = {**encoder_kwargs, "pattern_offset": PATTERN[0][0]}
    rebuilt = construct_sam("tiny", encoder_kwargs=kwargs)
    missing, unexpected = rebuilt.load_state_dict(sam.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("image_encoder.pattern.") for k in missing)
    return rebuilt, kwargs


def _with_second_codes(sam, encoder_kwargs: dict):
    """``sam`` rebuilt so that its encoder writes second codes and its decoder reads them, and its subpart
    candidate is kept near the clicks (``decoder_start.subpart_locality``); every other weight kept."""
    from trimask.models.build import construct_sam
    from trimask.training.decoder_start import SECOND, second_marks, subpart_locality

    kwargs = {**encoder_kwargs, "second_offset": SECOND[0][0]}
    rebuilt = construct_sam("tiny", encoder_kwargs=kwargs)
    rebuilt.load_state_dict(sam.state_dict())
    second_marks(rebuilt)
    subpart_locality(rebuilt)
    return rebuilt, kwargs


def _code_scene(first: int, i: int):
    """Scene ``first + i`` of the code stage (cropped as in training); a function, so workers can take it."""
    from trimask.training.scenes import generate_scene

    return generate_scene(first + i, varied_aspect=True)


def _stage_scenes(record: dict, stage: str) -> int:
    """How many scenes the ``stage`` (``code_pretrain``, ``pattern_pretrain``) of the runs in ``record``'s
    chain of ``init_record``s drew, so that training on from those weights draws new ones."""
    done = 0
    while record:
        summary = record.get(stage) or {}
        done += int(summary.get("scenes", summary.get("steps", 0)))  # code runs before --code-batch: a scene a step
        record = record.get("init_record")
    return done


def _code_scenes_done(init: Path, record: dict) -> int:
    """How many code pre-training scenes the runs that made ``init`` (its checkpoint's ``record``) used
    (``_stage_scenes``); an error when no run in the chain laid out the code-match decoder."""
    chain, code_match = record, False
    while chain:
        code_match = code_match or bool(chain.get("code_match_start"))
        chain = chain.get("init_record")
    if not code_match:
        raise TrimaskError(f"{init} was not made with --code-match-start, so it has no codes to train or match "
                           "thresholds to set.")
    return _stage_scenes(record, "code_pretrain")


def _train_code_path(sam, scene_base: int, done: int, args: argparse.Namespace, log) -> dict:
    """The --code-path-steps / --code-path-minutes stage on scenes ``scene_base + done`` on (``done``: the scenes the
    --init weights' runs drew in it); returns its summary."""
    from tqdm import tqdm

    from trimask.training.code_path import CodePathConfig, train_code_path

    cfg = CodePathConfig(lr=args.code_path_lr, level_weights=tuple(args.code_path_levels),
                         logit_scale=args.code_path_logit_scale, click_rounds=args.code_path_rounds,
                         code_dims=args.code_path_code_dims)
    with tqdm(total=args.code_path_steps or None, desc="code path", unit="step", file=sys.stderr) as bar:
        summary = train_code_path(sam, functools.partial(_code_scene, scene_base + done), cfg,
                                  steps=args.code_path_steps or 10**9, seed=args.seed, log=log, progress=bar.update,
                                  max_seconds=args.code_path_minutes * 60 if args.code_path_minutes else None)
    summary["first_scene"] = done
    log("code path: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    return summary


def _fit_single(sam, scene_base: int, args: argparse.Namespace, log) -> dict:
    """The --fit-single-scenes stage: token 0's answers on the reads' scenes, then the fit; returns its summary."""
    from tqdm import tqdm

    from trimask.training.scenes import generate_scene
    from trimask.training.single_fit import collect, fit_single

    with tqdm(desc="single-mask answers", unit="scene", file=sys.stderr) as bar:
        data = collect(sam, (generate_scene(scene_base + i) for i in range(args.fit_single_scenes)), seed=args.seed,
                       progress=bar.update)
    try:
        with tqdm(total=args.fit_single_steps, desc="single-mask fit", unit="step", file=sys.stderr) as bar:
            fit = fit_single(sam, data, steps=args.fit_single_steps, seed=args.seed, progress=bar.update)
    except ValueError as exc:
        raise TrimaskError(f"--fit-single-scenes {args.fit_single_scenes}: {exc}; use more scenes.") from exc
    fit["scenes"] = len(data)
    log("single-mask fit: " + json.dumps(fit))
    return fit


def _fit_iou_head(sam, scene_base: int, args: argparse.Namespace, log) -> dict:
    """The --iou-fit-minutes stage: collect the model's answers, fit a fresh IoU head; returns its summary."""
    from tqdm import tqdm

    from trimask.training.iou_fit import collect_answers, fit_iou_head
    from trimask.training.scenes import generate_scene

    head = sam.mask_decoder.iou_prediction_head
    _reinit(head)
    scenes = (generate_scene(scene_base + i, varied_aspect=True) for i in range(args.iou_fit_scenes or 10**7))
    with tqdm(total=args.iou_fit_scenes or None, desc="iou-fit answers", unit="scene", file=sys.stderr) as bar:
        answers = collect_answers(sam, scenes, seed=args.seed, max_seconds=args.iou_fit_minutes * 60 or None,
                                  progress=bar.update)
    fit = fit_iou_head(head, answers, seed=args.seed)
    fit["scenes"] = answers["scenes"]
    log("iou head fitted: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fit.items()}))
    return fit


def run_eval(args: argparse.Namespace) -> int:
    from trimask.training.evaluate import run_eval_command

    return run_eval_command(args)


def run_finetune(args: argparse.Namespace) -> int:
    from trimask.training.finetune import run_finetune_command

    return run_finetune_command(args)
