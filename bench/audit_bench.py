"""How often is --mode audit right? Plant label flips in a copy of a dataset and look for them.

A random 5 % of the images (seeded) are moved to a random other class folder in a copy
of the dataset; the audit runs with its defaults (or --max_minutes); the figures: how
many of the planted flips are in the top N of its list (N = the number planted), how
many of the top N are planted, both with Wilson intervals, the list's length and the
minutes. The unplanted suspects at the top (real flower_photos labels the audit doubts)
are drawn as a contact sheet for a person to judge.

    python bench/audit_bench.py --dataset ../shared/datasets/flower_photos-small [--seed 1] [--max_minutes 10] [-- AUDIT ARGS]

Arguments after ``--`` go to the audit command (for instance ``-- --image_size 96``).
Writes bench/results/audit-<dataset>-<seed>.json (with ``--name``, audit-<name>-<seed>.json)
and a contact sheet beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FLIPPED = 0.05


def plant(source: Path, target: Path, seed: int) -> dict[str, str]:
    """Copy ``source`` to ``target`` with FLIPPED of its images moved to another class; {new path: true class}."""
    shutil.copytree(source, target)
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    files = sorted(p for p in target.rglob("*") if p.is_file() and not p.name.startswith("."))
    rng = np.random.default_rng(seed)
    planted = {}
    for i in rng.choice(len(files), size=round(FLIPPED * len(files)), replace=False):
        true = files[i].parent.name
        wrong = rng.choice([c for c in classes if c != true])
        moved = target / wrong / f"flipped_{true}_{files[i].name}"
        files[i].rename(moved)
        planted[f"{wrong}/{moved.name}"] = true
    return planted


def contact_sheet(root: Path, suspects: list[dict], path: Path, size: int = 160) -> None:
    """The suspects' photos in a grid, each captioned with its given and suggested label."""
    columns = 5
    rows = max(1, -(-len(suspects) // columns))
    sheet = Image.new("RGB", (columns * size, rows * (size + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, s in enumerate(suspects):
        with Image.open(root / s["file"]) as im:
            thumb = im.convert("RGB").resize((size, size))
        x, y = (n % columns) * size, (n // columns) * (size + 30)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + size + 2), f"{n + 1}. {s['given']} -> {s['suggested']}", fill="black")
        draw.text((x + 2, y + size + 15), Path(s["file"]).name[:26], fill="gray")
    sheet.save(path)


def main() -> None:
    from simple_cnn.metrics import wilson_interval

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max_minutes", type=float)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="the results' name (default: the dataset's folder name)")
    parser.add_argument("extra", nargs="*", help="arguments for the audit command (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        planted = plant(args.dataset.resolve(), work / "data", args.seed)
        budget = ["--max_minutes", str(args.max_minutes)] if args.max_minutes else []
        audit_args = [*budget, *args.extra]
        started = time.monotonic()
        command = [sys.executable, "-m", "simple_cnn", "--mode", "audit", "--dataset_path", "data", *audit_args, "--json"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=work)
        if result.returncode != 0:
            sys.exit(result.stderr[-2000:])
        minutes = (time.monotonic() - started) / 60
        found = json.loads(result.stdout)
        n = len(planted)
        top = found["label_issues"][:n]
        hits = sum(s["file"] in planted for s in top)
        right_suggestion = sum(planted.get(s["file"]) == s["suggested"] for s in top)
        unplanted = [s for s in found["label_issues"] if s["file"] not in planted][:20]
        name = f"audit-{args.name or args.dataset.name}-{args.seed}"
        args.results.mkdir(parents=True, exist_ok=True)
        contact_sheet(work / "data", unplanted, args.results / f"{name}-unplanted-top20.png")
    figures = {
        "dataset": args.dataset.name,
        "seed": args.seed,
        "audit_args": args.extra,
        "images": found["audited_images"],
        "planted": n,
        "listed": len(found["label_issues"]),
        "planted_in_top_n": hits,
        "recall_top_n": hits / n,
        "recall_interval": list(wilson_interval(hits, n)),
        "precision_top_n": hits / max(1, len(top)),
        "precision_interval": list(wilson_interval(hits, len(top))),
        "suggestion_right_of_hits": right_suggestion,
        "minutes_whole_command": round(minutes, 2),
        "image_size": found["image_size"],
        "unusable_images": len(found["image_issues"]),
        "unplanted_top20": [{k: s[k] for k in ("file", "given", "suggested", "score")} for s in unplanted],
    }
    (args.results / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "unplanted_top20"}, indent=2))


if __name__ == "__main__":
    main()
