"""The audit's files: ``label_issues.csv`` (worst first), ``audit.json`` and ``audit.html``.

The page is built like the report page (``report.py``): one self-contained HTML file,
images as data URIs, every name escaped, under the same content security policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import report
from .files import atomic_output, write_csv, write_json

SHOWN = 60  # suspects shown on the page with thumbnails (every one is in the CSV)


def write_all(images_dir: Path, result, decoded, found: np.ndarray) -> list[str]:
    header = ["rank", "kind", "file", "given_label", "suggested_label", "score", "p_given", "p_suggested", "problem"]
    rows = [
        [str(n), "label", s["file"], s["given"], s["suggested"], f"{s['score']:.4f}", f"{s['p_given']:.4f}",
         f"{s['p_suggested']:.4f}", ""]
        for n, s in enumerate(result.label_issues, 1)
    ]  # fmt: skip
    rows += [["", "copies", " | ".join(group), "", "", "", "", "", "the same picture filed under different classes"]
             for group in result.mixed_copies]  # fmt: skip
    rows += [["", "image", i["file"], "", "", "", "", "", "; ".join(i["problems"])] for i in result.image_issues]
    csv_path = write_csv(images_dir / "label_issues.csv", header, rows)
    write_json(images_dir / "audit.json", result.as_dict())
    page = write_page(images_dir / "audit.html", result, decoded, found)
    return [str(csv_path), str(images_dir / "audit.json"), str(page)]


def write_page(path: Path, result, decoded, found: np.ndarray) -> Path:
    esc = report.esc
    row_of = {f: i for i, f in enumerate(decoded.files)}
    suspects = "".join(
        report.figure(
            report.thumbnail(decoded.x[row_of[i]]),
            f"{esc(decoded.files[row_of[i]])}<br>given <b>{esc(s['given'])}</b> ({s['p_given']:.2f})"
            f"<br>looks like <b>{esc(s['suggested'])}</b> ({s['p_suggested']:.2f})",
        )
        for i, s in zip((decoded.files[j] for j in found[:SHOWN]), result.label_issues[:SHOWN])
    )
    images = "".join(
        report.figure(
            report.thumbnail(decoded.x[row_of[i["file"]]]) if i["file"] in row_of else "", esc("; ".join(i["problems"]))
        )
        for i in result.image_issues[:SHOWN]
    )
    copies = "".join(f"<li>{', '.join(esc(f) for f in group)}</li>" for group in result.mixed_copies)
    body = [
        f'<div class="headline"><div class="metric"><span class="what">suspected label errors</span>'
        f'<b id="suspects">{len(result.label_issues)}</b><span class="what">of {result.audited_images} images</span></div>'
        f'<div class="metric"><span class="what">unusable images</span><b>{len(result.image_issues)}</b></div>'
        f'<div class="metric"><span class="what">copies under two classes</span><b>{len(result.mixed_copies)}</b></div></div>',
        '<p class="muted">Each image was judged by a network that never trained on it (cross-fitting over '
        f"{result.folds} folds at {result.image_size} pixels, {result.minutes:g} minutes); worst first. The audit changed "
        "no file: look, then fix the labels yourself.</p>",
        f'<h2>Suspected label errors</h2><div class="grid">{suspects or "<p>None found.</p>"}</div>',
        f'<h2>Unusable images</h2><div class="grid">{images or "<p>None found.</p>"}</div>',
        f"<h2>The same picture under different classes</h2>{f'<ul>{copies}</ul>' if copies else '<p>None found.</p>'}",
        report.split_counts_table({"class_names": result.class_names, "class_counts": result.class_counts}),
    ]
    page = report.REPORT_TEMPLATE.substitute(
        policy=report.REPORT_POLICY,
        title="audit: " + esc(result.dataset_path),
        style=report.STYLE,
        summary=f"<b>{len(result.class_names)} classes</b>, {result.audited_images} images of "
        f"<code>{esc(result.dataset_path)}</code>",
        body="\n".join(body),
        command=esc(report.command_line()),
        versions=esc(report.versions()),
    )
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
