"""
Command line: `mshg shard lsp|lspet|mpii|coco ...` and `mshg verify DIR`.
pipeline/cli.py calls add_commands(subparsers); `python -m shards.cli ...` works on its own too.
"""

import argparse
import os
import random
import sys

from shards import datasets
from shards.verify import verify
from shards.write import ShardError, write_shards


# skips that a dataset's own conventions produce, not problems of the input
EXPECTED_SKIPS = ("crowd annotation", "too few keypoints", "image file missing")


def add_output_options(p):
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    p.add_argument("--max-count", dest="maxcount", type=int, default=1000, metavar="N", help="samples per shard at most")
    p.add_argument("--max-size", dest="maxsize", type=float, default=1e9, metavar="BYTES", help="bytes per shard, about, at most")
    # the spellings before every multi-word flag took dashes, still accepted (WebDataset's ShardWriter arguments)
    p.add_argument("--maxcount", dest="maxcount", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--maxsize", dest="maxsize", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--outside-margin", type=float, default=4.0,
                   help="labelled joints further than this many px outside the image are dropped (reported)")
    p.add_argument("--non-jpeg", choices=("png", "jpg"), default="png",
                   help="how to store images that are not JPEG: png (lossless, default) or jpg (quality 95)")
    p.add_argument("--split-file", default=None,
                   help="text file of image file names, one a line: shard only the persons in those images")
    p.add_argument("--max-skipped", type=float, default=0.2, metavar="SHARE",
                   help="fail (exit 1) when more than this share of the persons is skipped for a problem (crowd, "
                        "too few keypoints and missing image files are expected and not counted); 0 samples always fails")
    p.add_argument("--order", choices=("shuffled", "source"), default="shuffled",
                   help="sample order in the tars: shuffled with --seed (default; DALI only shuffles within a "
                        "buffer of a few hundred samples, so the tars must not hold the dataset's order) or source")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(subparsers, formatter_class=argparse.HelpFormatter):
    """`shard` (one sub-command per format) and `verify`; `formatter_class` for every parser (mshg's shows defaults)."""
    F = formatter_class
    shard = subparsers.add_parser("shard", help="convert a pose dataset into WebDataset shards for DALI", formatter_class=F)
    formats = shard.add_subparsers(dest="format", required=True)
    for name, help_text in (("lspet", "LSP Extended: ROOT/joints.mat (14x3xN) and ROOT/images/im00001.jpg"),
                            ("lsp", "original LSP: ROOT/joints.mat (3x14xN, 3rd row invisibility), ROOT/images/im0001.jpg")):
        p = formats.add_parser(name, help=help_text, formatter_class=F)
        p.add_argument("--root", required=True, help="dataset folder holding joints.mat and images/")
        p.add_argument("--range", default=None, metavar="FIRST:LAST",
                       help="1-based inclusive image numbers, e.g. 1:8000 for the LSPET train split")
        add_output_options(p)
        p.set_defaults(func=run_shard)
    p = formats.add_parser("mpii", help="MPII: the JSON list {image, center, scale, joints, joints_vis} or the official .mat",
                           formatter_class=F)
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--annotations", required=True, help="annotation .json or mpii_human_pose_v1_u12_1.mat")
    add_output_options(p)
    p.set_defaults(func=run_shard)
    p = formats.add_parser("coco", help="any COCO-format keypoint file (COCO, CrowdPose, MHP, AI Challenger, "
                                        "Human-Art, ...): one sample per non-crowd person", formatter_class=F)
    p.add_argument("--images", required=True, help="folder of the images, e.g. coco/val2017 (file_names with "
                                                   "sub-folders or a split prefix are found under it)")
    p.add_argument("--annotations", required=True, help="person_keypoints_*.json or any COCO-format keypoint file")
    p.add_argument("--name", default="coco", help="the dataset's name in the manifest and in MLflow (e.g. crowdpose)")
    p.add_argument("--min-keypoints", type=int, default=1, help="persons with fewer labelled keypoints are skipped")
    p.add_argument("--keypoints-field", default=None, metavar="NAME",
                   help="the annotation field holding the category's joints (default: `keypoints`, or the one "
                        "field whose length matches the category, e.g. keypoints_21)")
    p.add_argument("--flip-pairs", default=None, metavar="A:B,...",
                   help="left/right joint pairs (names or 0-based indices); default: from left/right in the names")
    p.add_argument("--oks-sigmas", default=None, metavar="S,...",
                   help=f"per-joint OKS sigmas for COCO AP; default: COCO's by joint name, else "
                        f"{datasets.DEFAULT_OKS_SIGMA}")
    add_output_options(p)
    p.set_defaults(func=run_shard)

    p = subparsers.add_parser("verify", help="re-read shards against their manifest.json; non-zero exit on any problem",
                              formatter_class=F)
    p.add_argument("dir", help="shard directory holding manifest.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_verify)


def read_records(args):
    """-> (records, skipped, report, source, dataset table) for the chosen format, after --split-file."""
    table = datasets.DATASETS.get(args.format)
    if args.format in ("lsp", "lspet"):
        first, last = datasets.parse_range(args.range)
        reader = datasets.read_lsp if args.format == "lsp" else datasets.read_lspet
        records, skipped, report = reader(args.root, first, last)
        source = {"root": args.root, "annotations": os.path.join(args.root, "joints.mat")}
    else:
        source = {"images": args.images, "annotations": args.annotations}
        if args.format == "mpii":
            reader = datasets.read_mpii_mat if args.annotations.endswith(".mat") else datasets.read_mpii_json
            records, skipped, report = reader(args.images, args.annotations)
        else:
            table = datasets.coco_dataset(args.annotations, args.name, args.flip_pairs, args.oks_sigmas)
            records, skipped, report = datasets.read_coco(args.images, args.annotations, args.min_keypoints,
                                                          args.keypoints_field)
    if args.split_file:
        names = datasets.read_split_file(args.split_file)
        records = [r for r in records if os.path.basename(r.image) in names]
        source["split_file"] = args.split_file
    return records, skipped, report, source, table


def run_shard(args):
    if args.workers < 1 or args.maxcount < 1:
        print("error: --workers and --maxcount must be >= 1", file=sys.stderr)
        return 2
    try:
        records, skipped, report, source, table = read_records(args)
    except (datasets.AnnotationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.order == "shuffled":  # seeded: the same command writes the same tars
        random.Random(args.seed).shuffle(records)
    saved_args = {k: v for k, v in sorted(vars(args).items()) if k not in ("func", "quiet")}
    try:
        manifest = write_shards(
            records, skipped, table, args.out, prefix=args.prefix, maxcount=args.maxcount,
            maxsize=args.maxsize, workers=args.workers, overwrite=args.overwrite, margin=args.outside_margin,
            non_jpeg=args.non_jpeg, source=source, args=saved_args, report=report,
            progress=not args.quiet)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ... while writing: partial files were removed
        print(f"error: writing shards to {args.out} failed: {e}", file=sys.stderr)
        return 1
    n, s = manifest["num_samples"], manifest["seconds"]
    print(f"{n} samples in {len(manifest['shards'])} shards, {manifest['num_skipped']} skipped, "
          f"{manifest['num_dropped_joints']} joints dropped, {n / max(s, 1e-9):.0f} img/s -> {args.out}/manifest.json")
    reasons = {}
    for item in manifest["skipped"]:
        reason = item["reason"].split(":")[0].split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  skipped {count}: {reason}")
    if manifest.get("keypoints_field", "keypoints") != "keypoints":
        print(f"  joints read from field '{manifest['keypoints_field']}' (its length matches the category's joints)")
    if manifest.get("missing_images"):
        print(f"  {len(manifest['missing_images'])} images listed in the annotations are missing (manifest: missing_images)")
    if n == 0:
        print(f"error: wrote 0 samples to {args.out}: nothing usable was read (the reasons above, and the "
              f"manifest's skip report)", file=sys.stderr)
        return 1
    problems = sum(count for reason, count in reasons.items() if reason not in EXPECTED_SKIPS)
    total = n + manifest["num_skipped"]
    if problems > args.max_skipped * total:
        print(f"error: {problems} of {total} persons ({100 * problems / total:.0f} %) were skipped for a problem, "
              f"more than --max-skipped {args.max_skipped:g}: see the reasons above (the shards were written; "
              f"fix the input, or raise --max-skipped if they are expected)", file=sys.stderr)
        return 1
    return 0


def run_verify(args):
    problems = verify(args.dir, progress=not args.quiet)
    for p in problems:
        print(f"FAIL {args.dir}/{p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problems in {args.dir}", file=sys.stderr)
        return 1
    print(f"ok: {args.dir} matches its manifest")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m shards.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args()
    sys.exit(cli_args.func(cli_args))
