"""``images/report.html``: one self-contained page per run, to look at rather than read.

Train mode writes what it knows (the model and dataset, the training curves, training
examples); test mode completes it (the numbers with their uncertainty, the confusion
matrix with the images behind each mistake, the per-class table, the worst mistakes,
Grad-CAM overlays, skipped and set-aside files). Everything is inside the file: CSS
inline, pictures as ``data:`` URIs, no script, and a Content-Security-Policy that
forbids any request, so it opens from a USB stick or after ``docker cp``.

Built with the standard library (``string.Template``, ``html.escape``): every name
from a dataset (classes, files) goes through :func:`esc`, so a class folder named
``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
import math
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image

from . import __version__
from .errors import printable
from .files import atomic_output

THUMBNAIL_SIZE = 96  # pixels: the report's thumbnails are JPEG at this size
PER_CELL = 24  # images shown per confusion-matrix cell
GRADCAM = 4  # overlays of correct and of wrong test images, each

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #d5d9e0}
h3{font-size:1em;margin:1em 0 .3em}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:12px 16px;margin:8px 0}
.muted{color:#5b6475}.headline{display:flex;flex-wrap:wrap;gap:10px}
.metric{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px 14px;min-width:140px}
.metric b{display:block;font-size:1.6em}.metric span.what{color:#5b6475;font-size:.85em}
.scroll{overflow-x:auto}table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #e1e4ea;padding:4px 8px;text-align:right}th{background:#eef1f5}
td.cell.diag{background:#e3f1e6}td.cell.off.some{background:#fbe7e4}td.name,th.name{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cells{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.cells section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:4px 8px 8px;max-width:100%}
.cells section:target{outline:3px solid #d9534f}
figure{margin:0;background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:4px;width:104px;font-size:.75em}
figure img{width:96px;height:96px;display:block;image-rendering:auto}figcaption{overflow-wrap:anywhere}
img.wide{max-width:min(100%,720px);height:auto;background:#fff}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;overflow-wrap:anywhere;white-space:pre-wrap}
@media (max-width:600px){main{padding:8px}.metric{min-width:42%}}
"""

# No script, no fetch, no form and no base: a page built from a handed-over model file's
# metadata can neither run anything nor send anyone anywhere.
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; base-uri 'none'"
REPORT_TEMPLATE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="$policy">
<title>simple_cnn report: $title</title>
<style>$style</style>
</head>
<body><main>
<h1>simple_cnn report</h1>
<p class="card" id="summary">$summary</p>
$body
<h2>How it was made</h2>
<div class="card"><pre id="command">$command</pre><p class="muted">$versions</p></div>
</main></body>
</html>
""")


def esc(text) -> str:
    """A name from the dataset (or anything else), safe inside HTML text and attributes."""
    return html.escape(printable(str(text)), quote=True)


def data_uri(content: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(content).decode()}"


def png_file(path: Path) -> str:
    return data_uri(Path(path).read_bytes(), "png")


def thumbnail(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> str:
    """A uint8 RGB image as a ``size``-pixel JPEG data URI."""
    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
    return data_uri(buf.getvalue(), "jpeg")


def figure(uri: str, caption: str) -> str:
    """A thumbnail with its caption (``caption`` is HTML, already escaped)."""
    return f'<figure><img src="{uri}" alt=""><figcaption>{caption}</figcaption></figure>'


def command_line() -> str:
    """How this process was started, as a user would type it."""
    args = sys.argv[1:]
    if Path(sys.argv[0]).name in ("simple-cnn", "__main__.py"):
        return shlex.join(["simple-cnn", *args])
    return shlex.join([sys.executable, *sys.argv])


def versions() -> str:
    from .quiet import import_keras, import_tensorflow

    return (
        f"simple_cnn {__version__}, TensorFlow {import_tensorflow().__version__}, Keras {import_keras().__version__}, "
        f"Python {platform.python_version()}, {platform.platform(terse=True)}; page written "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}"
    )


@dataclass
class Evidence:
    """The test split as test mode saw it: images, labels, probabilities, files, Grad-CAM overlays."""

    x: np.ndarray
    y: np.ndarray
    probabilities: np.ndarray
    files: list[str]
    overlays: list[tuple[int, str]]  # (row, overlay data URI), correct ones first


def number(value, spec: str = "") -> str:
    """A number from a model file's metadata, formatted; "?" for anything that is not one.

    A handed-over model file may hold anything where a number belongs (markup, a script):
    nothing from it reaches the page but escaped text and numbers formatted as numbers.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "?"
    return format(value, spec)


def _section(metadata: dict, key: str) -> dict:
    value = metadata.get(key)
    return value if isinstance(value, dict) else {}


def summary_line(metadata: dict) -> str:
    """The model and dataset in one line."""
    names = metadata["class_names"]
    training = _section(metadata, "training")
    counts = ", ".join(f"{k} {number(v)}" for k, v in _section(metadata, "images").items()) or "unknown"
    shown_names = ", ".join(esc(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
    seconds = training.get("train_seconds")
    took = f", in {number(seconds / 60, '.1f')} min" if isinstance(seconds, int | float) and seconds else ""
    size = number(metadata["image_size"])
    return (
        f"<b>{len(names)} classes</b> ({shown_names}) from <code>{esc(metadata.get('dataset_path', '?'))}</code>; "
        f"images per split: {esc(counts)}; {size}x{size} pixels; trained "
        f"{esc(metadata.get('trained_at', '?'))}{took}, best epoch {number(training.get('best_epoch'))} of "
        f"{number(training.get('epochs_run'))}"
    )


def headline(test: dict | None, metadata: dict) -> str:
    training = _section(metadata, "training")
    if test is not None and test.get("multi_label"):
        return multi_label_headline(test)
    if test is None:
        best = number(training.get("best_val_accuracy"), ".3f")
        return (
            '<div class="headline"><div class="metric"><span class="what">best validation accuracy</span>'
            f"<b>{best}</b></div></div>"
            '<p class="muted">Run <code>--mode test</code> to add the test numbers, the confusion matrix and the mistakes.</p>'
        )
    low, high = test["accuracy_interval"]
    items = [
        ("test accuracy", f'<span id="accuracy">{test["accuracy"]:.3f}</span>', f"95% interval {low:.3f}-{high:.3f}"),
        ("balanced accuracy", f"{test['balanced_accuracy']:.3f}", "mean per-class recall"),
        ("macro-F1", f"{test['macro_f1']:.3f}", ""),
        ("always the largest class", f"{test['chance_accuracy']:.3f}", "the baseline"),
        ("calibration error", f"{test['calibration']['ece']:.3f}", "ECE, 15 bins"),
    ]
    if test.get("top_k_accuracy"):
        items.insert(3, (f"top-{test['top_k_accuracy']['k']} accuracy", f"{test['top_k_accuracy']['accuracy']:.3f}", ""))
    if test.get("coverage") is not None:
        answered = test["accuracy_answered"]
        text = f"{answered:.3f}" if answered is not None else "-"
        items.append((f"answered at {test['min_confidence']:g}", f"{test['coverage']:.1%}", f"accuracy {text}"))
    cards = "".join(
        f'<div class="metric"><span class="what">{w}</span><b>{v}</b><span class="what">{n}</span></div>' for w, v, n in items
    )
    seen = f'<p class="muted">on {test["test_images"]} test images, which training never saw.</p>'
    return f'<div class="headline">{cards}</div>{seen}'


def multi_label_headline(test: dict) -> str:
    items = [
        ("mean average precision", f'<span id="map">{test["mean_average_precision"]:.3f}</span>', "area under each PR curve"),
        ("each label at its frequency", f"{test['chance_mean_average_precision']:.3f}", "the baseline's mAP"),
        ("micro-F1", f"{test['micro_f1']:.3f}", "at the chosen thresholds"),
        ("macro-F1", f"{test['macro_f1']:.3f}", ""),
        ("subset accuracy", f"{test['subset_accuracy']:.3f}", "every label right"),
        ("Hamming loss", f"{test['hamming_loss']:.3f}", "wrong label decisions"),
    ]
    cards = "".join(
        f'<div class="metric"><span class="what">{w}</span><b>{v}</b><span class="what">{n}</span></div>' for w, v, n in items
    )
    seen = f'<p class="muted">on {test["test_images"]} test images (several labels each), which training never saw.</p>'
    return f'<div class="headline">{cards}</div>{seen}'


def multi_label_table(test: dict) -> str:
    rows = []
    for name, r in test["per_class"].items():
        ap = number(r["average_precision"], ".3f") if r["average_precision"] is not None else "-"
        rows.append(
            f'<tr><td class="name">{esc(name)}</td><td>{number(r["precision"], ".3f")}</td><td>{number(r["recall"], ".3f")}</td>'
            f"<td>{number(r['f1'], '.3f')}</td><td>{ap}</td><td>{number(r['threshold'], '.2f')}</td>"
            f"<td>{number(r['support'])}</td></tr>"
        )
    return (
        '<h2>Per label</h2><div class="scroll"><table class="per-class"><tr><th class="name">label</th><th>precision</th>'
        "<th>recall</th><th>F1</th><th>average precision</th><th>threshold</th><th>test images</th></tr>"
        f"{''.join(rows)}</table></div>"
    )


def split_counts_table(metadata: dict) -> str:
    """Each split's images per class, as the model's training recorded them ('' for older models)."""
    counts = _section(metadata, "class_counts")
    if not all(isinstance(counts.get(s), dict) for s in ("train", "val", "test")):
        return ""
    rows = "".join(
        f'<tr><td class="name">{esc(name)}</td>'
        + "".join(f"<td>{number(counts[s].get(name))}</td>" for s in ("train", "val", "test"))
        + "</tr>"
        for name in metadata["class_names"]
    )
    return (
        '<h2>Images per class and split</h2><div class="scroll"><table class="per-class"><tr><th class="name">class</th>'
        f"<th>train</th><th>validation</th><th>test</th></tr>{rows}</table></div>"
    )


def confusion_section(test: dict, evidence: Evidence) -> str:
    """The matrix as a table (counts; a mistake cell links to its images) and the images per cell."""
    names = test["class_names"]
    matrix = test["confusion_matrix"]
    predicted = evidence.probabilities.argmax(axis=1)
    head = "".join(f'<th scope="col">{esc(n)}</th>' for n in names)
    rows, cells = [], []
    for i, row in enumerate(matrix):
        tds = []
        for j, count in enumerate(row):
            kind = "diag" if i == j else "off" + (" some" if count else "")
            text = f'<a href="#cell-{i}-{j}">{count}</a>' if i != j and count else str(count)
            tds.append(f'<td class="cell {kind}">{text}</td>')
            if i != j and count:
                rows_here = np.flatnonzero((evidence.y == i) & (predicted == j))[:PER_CELL]
                pictures = "".join(
                    figure(thumbnail(evidence.x[r]), f"{esc(evidence.files[r])}<br>p={evidence.probabilities[r, j]:.2f}")
                    for r in rows_here
                )
                more = f' <span class="muted">(the first {PER_CELL} of {count})</span>' if count > PER_CELL else ""
                cells.append(
                    f'<section id="cell-{i}-{j}"><h3>true {esc(names[i])}, predicted {esc(names[j])}: {count}{more}</h3>'
                    f'<div class="grid">{pictures}</div></section>'
                )
        rows.append(f'<tr><th scope="row" class="name">{esc(names[i])}</th>{"".join(tds)}</tr>')
    table = (
        '<div class="scroll"><table class="confusion"><caption class="muted">true class down, predicted across; '
        f'a red cell links to its images</caption><tr><th class="name">true \\ predicted</th>{head}</tr>'
        f"{''.join(rows)}</table></div>"
    )
    gallery = f'<div class="cells">{"".join(cells)}</div>' if cells else "<p>No mistakes.</p>"
    return f"<h2>Confusion matrix</h2>{table}{gallery}"


def per_class_table(test: dict) -> str:
    rows = []
    for name in test["class_names"]:
        r = test["per_class"][name]
        rows.append(
            f'<tr><td class="name">{esc(name)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
            f"<td>{r['f1-score']:.3f}</td><td>{int(r['support'])}</td></tr>"
        )
    return (
        '<h2>Per class</h2><div class="scroll"><table class="per-class"><tr><th class="name">class</th><th>precision</th>'
        f"<th>recall</th><th>F1</th><th>test images</th></tr>{''.join(rows)}</table></div>"
    )


def mistakes_section(test: dict, evidence: Evidence, worst: np.ndarray) -> str:
    names = test["class_names"]
    pictures = []
    for r in worst[:16]:
        p, guess, true = evidence.probabilities[r], int(evidence.probabilities[r].argmax()), int(evidence.y[r])
        pictures.append(
            figure(
                thumbnail(evidence.x[r]),
                f"{esc(evidence.files[r])}<br>true {esc(names[true])} ({p[true]:.2f})"
                f"<br>said {esc(names[guess])} ({p[guess]:.2f})",
            )
        )
    body = f'<div class="grid">{"".join(pictures)}</div>' if pictures else "<p>No mistakes.</p>"
    return f'<h2>The worst mistakes</h2><p class="muted">highest loss first; every one is in mistakes.csv</p>{body}'


def gradcam_section(test: dict, evidence: Evidence) -> str:
    if not evidence.overlays:
        return ""
    names = test["class_names"]
    pictures = []
    for r, uri in evidence.overlays:
        guess, true = int(evidence.probabilities[r].argmax()), int(evidence.y[r])
        verdict = "right" if guess == true else f"wrong (true {esc(names[true])})"
        pictures.append(figure(uri, f"said {esc(names[guess])}: {verdict}<br>{esc(evidence.files[r])}"))
    return (
        '<h2>Where it looked</h2><p class="muted">Grad-CAM on the last convolutional block: red is where the evidence '
        f'for the predicted class came from.</p><div class="grid">{"".join(pictures)}</div>'
    )


def files_section(skipped: list[dict], duplicates: dict | None) -> str:
    parts = []
    if skipped:
        items = "".join(f"<li><code>{esc(s['file'])}</code>: {esc(s['reason'])}</li>" for s in skipped)
        parts.append(f"<h3>Skipped: {len(skipped)} unreadable files</h3><ul>{items}</ul>")
    if duplicates and duplicates.get("groups"):
        aside = "".join(
            f"<li><code>{esc(c['file'])}</code>, a copy of <code>{esc(c['copy_of'])}</code></li>" for c in duplicates["set_aside"]
        )
        mixed = "".join(f"<li>{', '.join(esc(f) for f in g)}</li>" for g in duplicates["mixed_labels"])
        parts.append(
            f"<h3>Copies: {duplicates['groups']} groups ({duplicates['images']} images)</h3>"
            + (f"<p>Set aside, so that no copy straddles the splits:</p><ul>{aside}</ul>" if aside else "")
            + (f"<p>Filed under different classes (labelling errors?):</p><ul>{mixed}</ul>" if mixed else "")
        )
    return "<h2>Files</h2>" + ("".join(parts) or "<p>Every image was read; no copies.</p>")


def picture(title: str, path: Path | None) -> str:
    """A PNG file of ours, embedded under its title ('' if there is no such file)."""
    if path is None or not Path(path).is_file():
        return ""
    return f'<h2>{esc(title)}</h2><img class="wide" src="{png_file(path)}" alt="{esc(title)}">'


def write_report(
    images_dir: Path,
    metadata: dict,
    curves: Path | None,
    figures: dict[str, Path],
    test: dict | None = None,
    evidence: Evidence | None = None,
    worst: np.ndarray | None = None,
    skipped: list[dict] | None = None,
    duplicates: dict | None = None,
) -> Path:
    """Write ``images_dir/report.html`` atomically.

    ``curves``: the training curves PNG; ``figures``: more PNGs by title, shown after the
    test sections. ``test`` is ``TestResult.as_dict()``; without it (train mode) the page
    holds the training part only.
    """
    body = [headline(test, metadata), picture("Training curves", curves)]
    if test is not None and test.get("multi_label"):
        body.append(multi_label_table(test))
    elif test is not None and evidence is not None:
        body += [
            confusion_section(test, evidence),
            per_class_table(test),
            mistakes_section(test, evidence, worst if worst is not None else np.zeros(0, int)),
            gradcam_section(test, evidence),
        ]
    body += [picture(title, path) for title, path in figures.items()]
    body += [split_counts_table(metadata), files_section(skipped or [], duplicates)]
    page = REPORT_TEMPLATE.substitute(
        policy=REPORT_POLICY,
        title=esc(metadata.get("dataset_path", "")),
        style=STYLE,
        summary=summary_line(metadata),
        body="\n".join(body),
        command=esc(command_line()),
        versions=esc(versions()),
    )
    path = Path(images_dir) / "report.html"
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
