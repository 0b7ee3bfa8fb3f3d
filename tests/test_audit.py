"""--mode audit: planted label flips are found, a clean dataset gives a short list, bad input is one line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, assert_one_line_error, chromium, make_shapes_dataset, run_cli, start_cli
from simple_cnn import quality
from simple_cnn.audit import label_issues, self_confidence


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A shapes dataset with six images moved to a wrong class folder and two unusable images, audited by the CLI
    (killed after its first fold, then run again to the end)."""
    work = tmp_path_factory.mktemp("audit")
    root = make_shapes_dataset(work / "ds", per_class=40)
    rng = np.random.default_rng(0)
    files = sorted(root.rglob("*.png"))
    flipped = set()
    for i in rng.choice(len(files), 6, replace=False):
        wrong = [c for c in CLASSES if c != files[i].parent.name][int(rng.integers(2))]
        shutil.move(files[i], root / wrong / f"flip_{files[i].name}")
        flipped.add(f"{wrong}/flip_{files[i].name}")
    Image.new("RGB", (32, 32), (3, 3, 3)).save(root / "circle" / "black.png")
    Image.new("RGB", (200, 20), (120, 60, 30)).save(root / "square" / "strip.png")
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    # Killed once its first fold is saved: nothing half-written, and the run again resumes from that fold.
    killed = start_cli("--mode", "audit", "--dataset_path", "ds", "--json", cwd=work)
    seen = []
    for line in killed.stderr:
        seen.append(line)
        if "Fold 2 of 4" in line:
            break
    killed.kill()
    killed.communicate()
    assert any("Fold 2 of 4" in line for line in seen), "".join(seen)
    assert not any((work / "images" / name).exists() for name in ("audit.json", "label_issues.csv", "audit.html"))
    result = run_cli("--mode", "audit", "--dataset_path", "ds", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "Fold 1 of 4: kept from an interrupted audit" in result.stderr and "Fold 2 of 4: training" in result.stderr
    assert not any((work / "images" / ".audit-state").iterdir())  # the finished folds' state is gone
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # nothing changed
    return work, flipped, json.loads(result.stdout)


def test_audit_finds_planted_flips_and_unusable_images(audited):
    work, flipped, found = audited
    top = {s["file"] for s in found["label_issues"][: len(flipped)]}
    assert len(top & flipped) >= 4  # chance: 6 of 128 images
    assert len(found["label_issues"]) <= 3 * len(flipped)  # a short list, not a ranking of everything
    for s in found["label_issues"]:
        assert s["given"] != s["suggested"] and 0 <= s["p_given"] <= 1 and s["score"] == round(1 - s["p_given"], 4)
    problems = {i["file"]: " ".join(i["problems"]) for i in found["image_issues"]}
    assert "nearly black" in problems["circle/black.png"] and "nearly one colour" in problems["circle/black.png"]
    assert "aspect ratio" in problems["square/strip.png"]
    assert found["audited_images"] == 122 and found["folds"] == 4
    with open(work / "images" / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows if r["kind"] == "label"] == [s["file"] for s in found["label_issues"]]
    assert {r["kind"] for r in rows} == {"label", "image"} and rows[0]["rank"] == "1"

    with chromium() as browser:
        browser.get((work / "images" / "audit.html").as_uri())
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
        requests = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [r for r in requests if not r.startswith("data:")] == []
        assert browser.find_element("id", "suspects").text == str(len(found["label_issues"]))
        images = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
        assert len(images) >= len(found["label_issues"]) and all(done and width > 0 for done, width in images)


def test_audit_refuses_what_it_cannot_cross_fit_in_one_line(tmp_path):
    make_shapes_dataset(tmp_path / "small", per_class=5)
    assert_one_line_error(run_cli("--mode", "audit", "--dataset_path", "small", cwd=tmp_path), 1, "too few", "50 images")
    assert_one_line_error(run_cli("--mode", "audit", "--dataset_path", "nowhere", cwd=tmp_path), 1, "nowhere")
    labels = tmp_path / "small" / "labels.csv"
    labels.write_text("path,label\ncircle/circle_000.png,a|b\ncircle/circle_001.png,b\n")
    result = run_cli("--mode", "audit", "--dataset_path", "small", "--labels", str(labels), cwd=tmp_path)
    assert_one_line_error(result, 2, "single-label")


def test_confident_learning_flags_confident_disagreements_only():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 50)
    p = np.full((150, 3), 0.05)
    p[np.arange(150), y] = 0.9
    p += rng.uniform(0, 0.02, size=p.shape)
    p[[3, 60]] = [[0.05, 0.05, 0.9], [0.9, 0.05, 0.05]]  # labelled 0 and 1, confidently something else
    p[100] = [0.3, 0.35, 0.35]  # unsure: no class above its threshold disagrees confidently
    p /= p.sum(axis=1, keepdims=True)
    found = label_issues(p, y)
    assert set(found) == {3, 60}
    assert (np.diff(self_confidence(p[found], y[found])) >= 0).all()  # worst first


def test_suspects_are_ranked_by_how_unlikely_their_given_label_is():
    """Self-confidence, not the normalized margin: of two confident disagreements, the label the network
    finds less likely comes first, even where its margin to the other class is the smaller one."""
    y = np.repeat(np.arange(3), 50)
    p = np.full((150, 3), 0.04)
    p[np.arange(150), y] = 0.92
    p[3] = [0.02, 0.93, 0.05]  # labelled 0: p_given 0.02, margin -0.91
    p[60] = [0.96, 0.04, 0.00]  # labelled 1: p_given 0.04, margin -0.92
    assert list(label_issues(p, y)) == [3, 60]


def test_quality_thresholds_flag_what_they_say():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    flat = np.broadcast_to(np.array([128, 60, 30], np.uint8), (32, 32, 3))  # one colour, not grey
    grey = np.repeat(rng.integers(0, 255, size=(32, 32, 1), dtype=np.uint8), 3, axis=2)
    x = np.stack([sharp] * 10 + [flat, grey])
    m = quality.measures(x, [(320, 240)] * 10 + [(320, 240), (10, 10)])
    found = quality.problems(m, 32)
    assert all(p == [] for p in found[:10])
    assert any("one colour" in p for p in found[10])
    assert any("grayscale" in p for p in found[11]) and any("smaller" in p for p in found[11])


def test_quality_measures_each_image_the_same_in_chunks():
    """The measures come a chunk of images at a time (for memory); each image's are its own, in order."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, size=(quality.CHUNK + 3, 8, 8, 3), dtype=np.uint8)
    x[quality.CHUNK - 1] = 0  # black, the last of the first chunk
    x[quality.CHUNK] = 255  # white, the first of the second
    sizes = [(64 + i, 48) for i in range(len(x))]
    m = quality.measures(x, sizes)
    for i in (0, quality.CHUNK - 1, quality.CHUNK, len(x) - 1):
        alone = quality.measures(x[i : i + 1], sizes[i : i + 1])
        assert {k: v[0] for k, v in alone.items()} == {k: v[i] for k, v in m.items()}, i
    found = quality.problems(m, 8)
    assert any("nearly black" in p for p in found[quality.CHUNK - 1])
    assert any("nearly white" in p for p in found[quality.CHUNK])
    assert quality.measures(x[:0], [])["sharpness"].shape == (0,)
