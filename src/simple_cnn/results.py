"""What each mode returns: small dataclasses, each with one JSON form and one human summary.

``as_dict()`` is what ``--json`` prints (and what ``metrics.json`` holds); ``human()`` is
the summary printed on stdout, and ``notes()`` the lines for stderr. Adding a field to a
mode's result means touching this file and the function that fills it in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

UNKNOWN = "unknown"  # classify's answer below --min_confidence


def answer(top_k: list[dict], min_confidence: float, labels: list[dict] | None = None, far: bool = False) -> str:
    """The most likely class, or "unknown" when its probability is below ``min_confidence``;
    multi-label (``labels``: those at or above their thresholds): the most likely of them, or "unknown";
    "unknown" too when the image is ``far`` from every training class (``--unknown``, ``unknown.py``)."""
    if far:
        return UNKNOWN
    if labels is not None:
        return labels[0]["class"] if labels else UNKNOWN
    return top_k[0]["class"] if top_k[0]["probability"] >= min_confidence else UNKNOWN


def prediction(
    top_k: list[dict], min_confidence: float, labels: list[dict] | None = None, novelty: dict | None = None, unknown=False
) -> dict:
    """One image's answer as every output shows it: the class (or "unknown"), its probability,
    the top classes, for a multi-label model the labels given, and with a detector the
    image's distance (``novelty``: ``unknown.novelty``; ``unknown``: --unknown answers by it)."""
    given = labels[0]["probability"] if labels else top_k[0]["probability"]
    far = bool(unknown and novelty and novelty["beyond_threshold"])
    return (
        {"class": answer(top_k, min_confidence, labels, far), "probability": given, "top_k": top_k}
        | ({"labels": labels} if labels is not None else {})
        | (novelty or {})
    )


def top_classes(probabilities: np.ndarray, class_names: list[str], top_k: int) -> list[dict]:
    """The ``top_k`` most likely classes of one image's probabilities, most likely first."""
    order = np.argsort(probabilities)[::-1][: max(1, top_k)]
    return [{"class": class_names[i], "probability": float(probabilities[i])} for i in order]


@dataclass
class Result:
    mode: ClassVar[str] = ""

    def as_dict(self) -> dict:
        return {"mode": self.mode, **asdict(self)}

    def human(self) -> str:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines for stderr (skipped files, throughput) that do not belong in the result."""
        return []


@dataclass(kw_only=True)
class DatasetFacts(Result):
    """What train and test results say about the dataset (``dataset.ImageDataset.summary``), by keyword."""

    class_counts: dict | None = None  # images of each class in each split
    labels_rows_skipped: dict | None = None  # a labels file's unusable rows: count, reasons, examples
    groups: dict | None = None  # with --group_by or a group column: groups per split, large groups
    multi_label: bool = False
    trained_on_not_scored: int = 0  # test images the model had trained on (the dataset changed since)


def _copies_lines(found: dict | None) -> list[str]:
    """e.g. 'Copies: 2 groups (5 images); 3 set aside: a.jpg (copy of b.jpg), ...'."""
    if not found or not found["groups"]:
        return []
    aside = found["set_aside"]
    some = ", ".join(f"{c['file']} (copy of {c['copy_of']})" for c in aside[:3]) + (", ..." if len(aside) > 3 else "")
    line = f"Copies: {found['groups']} group(s) of identical or near-identical images ({found['images']} images)"
    line += f"; {len(aside)} set aside: {some}" if aside else "; none straddles the splits"
    mixed = [f"Filed under different classes: {', '.join(g)}" for g in found["mixed_labels"]]
    return [line, *mixed]


@dataclass
class TrainResult(DatasetFacts):
    mode: ClassVar[str] = "train"
    dataset_path: str
    class_names: list[str]
    images: dict[str, int]  # images per split, found by the scan
    images_used: dict[str, int]  # images decoded and used, per split
    skipped: list[dict]  # {"file", "reason"}
    image_size: int
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    train_seconds: float
    config: dict
    model_file_path: str
    distribute: dict
    tflite_file_path: str | None = None
    calibration: dict | None = None  # the temperature and the validation ECE before and after
    imbalance: float | None = None  # the largest class over the smallest, in the training split
    duplicates: dict | None = None  # dataset.Copies.report(): groups, images, set_aside, mixed_labels
    thresholds: list[float] | None = None  # multi-label: each class's, chosen on the validation split
    unknown: dict | None = None  # the unknown detector's threshold and settings (unknown.fit_on_splits)
    layout: dict = field(default_factory=dict)  # train.layout_metadata(): how labels and splits were made
    images_written: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def human(self) -> str:
        return "\n".join(
            [
                f"Best epoch {self.best_epoch} of {self.epochs_run}: validation accuracy "
                f"{self.best_val_accuracy:.3f}, loss {self.best_val_loss:.3f}",
                f"Images used: train {self.images_used['train']}, validation {self.images_used['val']}; "
                f"test {self.images['test']} held out for --mode test; {len(self.skipped)} files skipped",
                *_copies_lines(self.duplicates),
                f"Model saved to {self.model_file_path}",
                f"Wrote {', '.join(self.images_written)}",
                f"Done in {self.wall_seconds:.1f} s (training {self.train_seconds:.1f} s)",
            ]
        )


@dataclass
class WorkerResult(Result):
    """A multi-worker run's non-chief worker: it trains, the chief saves."""

    mode: ClassVar[str] = "train"
    worker: int
    workers: int
    images_used: dict[str, int]
    steps_per_epoch: int | None
    epochs_run: int
    train_seconds: float
    wall_seconds: float

    def human(self) -> str:
        return (
            f"Worker {self.worker} of {self.workers} done: {self.epochs_run} epochs, "
            f"{self.images_used['train']} training images, {self.steps_per_epoch} steps per epoch; "
            "the chief saved the model"
        )


def unknown_lines(scored: dict | None) -> list[str]:
    """Test mode's lines on --unknown_path: the distance beside the softmax (``unknown.score_unknown``)."""
    if not scored:
        return []
    d, s = scored["distance"], scored["softmax"]
    return [
        f"Images of no class (--unknown_path): {scored['unknown_images']}, {len(scored['skipped'])} skipped. "
        f"Told from the test images with an AUROC of {d['auroc']:.3f} by the distance, {s['auroc']:.3f} by the softmax",
        f"  At the thresholds chosen in training: the distance ({d['threshold']:.1f}) catches {d['caught']:.1%} of them "
        f"and keeps {d['test_kept']:.1%} of the test images; the softmax ({s['threshold']:.2f}) catches {s['caught']:.1%} "
        f"and keeps {s['test_kept']:.1%}",
    ]


@dataclass
class TestResult(DatasetFacts):
    mode: ClassVar[str] = "test"
    model_file_path: str
    dataset_path: str
    test_images: int
    skipped: list[dict]
    accuracy: float
    accuracy_interval: list[float]  # 95% Wilson score interval
    balanced_accuracy: float  # the mean of the per-class recalls
    macro_f1: float
    top_k_accuracy: dict | None  # {"k", "accuracy"}, with 3 or more classes
    loss: float
    chance_accuracy: float  # the majority class's share: what always guessing it scores
    calibration: dict  # ece, ece_uncalibrated, temperature, bins (15 equal-width confidence bins)
    duplicates: dict  # dataset.Copies.report(): copies of training images are set aside, not scored
    min_confidence: float | None  # with --min_confidence: the share answered and their accuracy
    coverage: float | None
    accuracy_answered: float | None
    class_names: list[str]
    per_class: dict
    confusion_matrix: list[list[int]]
    images: dict[str, int] | None = None  # images per split, found by the scan
    imbalance: float | None = None  # the largest class over the smallest, in the training split
    report: str = field(default="", repr=False)  # scikit-learn's text report, for humans only
    unknown: dict | None = None  # --unknown_path: unknown.score_unknown()
    images_written: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = super().as_dict()
        d.pop("report")
        return d

    def _calibration_line(self) -> str:
        c = self.calibration
        before = f" (uncalibrated: {c['ece_uncalibrated']:.3f}, temperature {c['temperature']:.2f})" if c["temperature"] else ""
        return f"Expected calibration error {c['ece']:.3f}{before}"

    def _coverage_lines(self) -> list[str]:
        if self.min_confidence is None:
            return []
        answered = f"{self.accuracy_answered:.3f}" if self.accuracy_answered is not None else "none answered"
        return [f"At --min_confidence {self.min_confidence:g}: {self.coverage:.1%} of test images answered, accuracy {answered}"]

    def human(self) -> str:
        return "\n".join(
            [
                f"Test split of {self.dataset_path}: {self.test_images} images, {len(self.skipped)} files skipped",
                *_copies_lines(self.duplicates),
                f"Accuracy {self.accuracy:.3f} (95% interval {self.accuracy_interval[0]:.3f}-{self.accuracy_interval[1]:.3f}; "
                f"always guessing the largest class: {self.chance_accuracy:.3f}), loss {self.loss:.3f}",
                f"Balanced accuracy {self.balanced_accuracy:.3f}, macro-F1 {self.macro_f1:.3f}"
                + (
                    f", top-{self.top_k_accuracy['k']} accuracy {self.top_k_accuracy['accuracy']:.3f}"
                    if self.top_k_accuracy
                    else ""
                ),
                self._calibration_line(),
                *self._coverage_lines(),
                *unknown_lines(self.unknown),
                self.report.rstrip(),
                f"Wrote {', '.join(self.images_written)}",
            ]
        )


@dataclass
class MultiLabelTestResult(DatasetFacts):
    """Test mode for a multi-label model (``multilabel.score``)."""

    mode: ClassVar[str] = "test"
    model_file_path: str
    dataset_path: str
    class_names: list[str]
    test_images: int
    skipped: list[dict]
    mean_average_precision: float
    chance_mean_average_precision: float  # each label predicted at its frequency: the baseline
    micro_f1: float
    macro_f1: float
    subset_accuracy: float  # every label of an image right
    hamming_loss: float  # the share of wrong label decisions
    per_class: dict  # precision, recall, f1, average_precision, threshold, support
    duplicates: dict | None = None
    images: dict[str, int] | None = None
    imbalance: float | None = None
    unknown: dict | None = None  # --unknown_path: unknown.score_unknown()
    images_written: list[str] = field(default_factory=list)

    def human(self) -> str:
        rows = [f"{'label':20s} precision recall    F1    AP threshold images"]
        for name, r in self.per_class.items():
            ap = f"{r['average_precision']:.3f}" if r["average_precision"] is not None else "   - "
            rows.append(
                f"{name[:20]:20s} {r['precision']:9.3f} {r['recall']:6.3f} {r['f1']:5.3f} {ap} {r['threshold']:9.2f} "
                f"{r['support']:6d}"
            )
        return "\n".join(
            [
                f"Test split of {self.dataset_path}: {self.test_images} images (multi-label), {len(self.skipped)} files skipped",
                *_copies_lines(self.duplicates),
                f"Mean average precision {self.mean_average_precision:.3f} (each label at its frequency: "
                f"{self.chance_mean_average_precision:.3f}), micro-F1 {self.micro_f1:.3f}, macro-F1 {self.macro_f1:.3f}",
                f"Subset accuracy {self.subset_accuracy:.3f} (every label right), Hamming loss {self.hamming_loss:.3f}",
                *unknown_lines(self.unknown),
                *rows,
                f"Wrote {', '.join(self.images_written)}",
            ]
        )


@dataclass
class ClassifyResult(Result):
    """One image's answer."""

    mode: ClassVar[str] = "classify"
    image: str
    model_file_path: str
    runtime: str  # "litert" or "keras"
    top_k: list[dict]  # {"class", "probability"}, most likely first
    min_confidence: float = 0.0  # below it, the answer is "unknown"
    explanation: str | None = None  # --explain: the Grad-CAM overlay's path
    labels: list[dict] | None = None  # multi-label: every label at or above its threshold (multilabel.labels_above)
    novelty: dict | None = None  # with a detector: the distance, its threshold, whether beyond (unknown.novelty)
    unknown: bool = False  # --unknown: "unknown" beyond the distance threshold

    @property
    def answer(self) -> str:
        return self.as_dict()["class"]

    def as_dict(self) -> dict:
        where = {"mode": self.mode, "image": self.image, "model_file_path": self.model_file_path, "runtime": self.runtime}
        explanation = {"explanation": self.explanation} if self.explanation else {}
        return where | prediction(self.top_k, self.min_confidence, self.labels, self.novelty, self.unknown) | explanation

    def human(self) -> str:
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in self.top_k)
        first = self.top_k[0]
        where = f"\nWhere it looked (Grad-CAM): {self.explanation}" if self.explanation else ""
        if self.unknown and self.novelty and self.novelty["beyond_threshold"]:
            n = self.novelty
            head = (
                f"{self.image}: unknown (at a distance of {n['distance']:.1f} from every class seen in training, beyond "
                f"{n['distance_threshold']:.1f}; the most likely, {first['class']}, has {first['probability']:.3f})"
            )
            return f"{head}\nTop {len(self.top_k)}: {top}{where}"
        if self.labels is not None:
            given = (
                ", ".join(f"{t['class']} {t['probability']:.3f}" for t in self.labels)
                or "unknown (no label passes its threshold)"
            )
            return f"{self.image}: {given}\nTop {len(self.top_k)}: {top}"
        if self.answer == UNKNOWN:
            best = f"{first['class']}, has {first['probability']:.3f} < {self.min_confidence:g}"
            head = f"{self.image}: unknown (the most likely, {best})"
        else:
            head = f"{self.image}: {first['class']} (probability {first['probability']:.3f})"
        return f"{head}\nTop {len(self.top_k)}: {top}{where}"


@dataclass
class ClassifyManyResult(Result):
    """Many images' answers (a folder or a glob)."""

    mode: ClassVar[str] = "classify"
    model_file_path: str
    runtime: str
    predictions: list[dict]  # ClassifyResult.as_dict() without mode, model and runtime (with "explanation")
    skipped: list[dict]
    seconds: float
    images_per_second: float | None
    output: str | None = None  # the --output file, when written

    def human(self) -> str:
        if self.output:
            return ""
        rows = []
        for r in self.predictions:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
            where = f"\t{r['explanation']}" if "explanation" in r else ""
            labelled = "labels" in r and r["class"] != UNKNOWN
            given = "|".join(t["class"] for t in r["labels"]) if labelled else r["class"]
            rows.append(f"{r['image']}\t{given}\t{r['probability']:.3f}\t{top}{where}")
        return "\n".join(rows)

    def notes(self) -> list[str]:
        where = f", written to {self.output}" if self.output else ""
        return [f"skipped {s['file']}: {s['reason']}" for s in self.skipped] + [
            f"Classified {len(self.predictions)} images ({self.images_per_second} images/s, "
            f"{self.runtime}){where}; {len(self.skipped)} skipped"
        ]


@dataclass
class CompareResult(Result):
    """Compare mode: every model on the same test images, and each against the first (``compare.py``)."""

    mode: ClassVar[str] = "compare"
    dataset_path: str
    test_images: int
    class_names: list[str]
    models: list[dict]  # model, accuracy, accuracy_interval, balanced_accuracy
    pairs: list[dict]  # compare.paired(): differences, intervals, McNemar's p, the verdict
    duplicates: dict | None = None
    images_written: list[str] = field(default_factory=list)

    def human(self) -> str:
        lines = [f"The same {self.test_images} test images of {self.dataset_path}, which none of the models trained on:"]
        for m in self.models:
            low, high = m["accuracy_interval"]
            lines.append(
                f"  {m['model']}: accuracy {m['accuracy']:.3f} ({low:.3f}-{high:.3f}), "
                f"balanced accuracy {m['balanced_accuracy']:.3f}"
            )
        for p in self.pairs:
            low, high = p["balanced_accuracy_interval"]
            lines += [
                p["verdict"],
                f"  balanced accuracy {100 * p['balanced_accuracy_difference']:+.1f} points "
                f"({100 * low:.1f} to {100 * high:.1f}), "
                f"p = {p['balanced_accuracy_p']:.2g}; right only by {p['a']}: {p['only_a_right']}, only by {p['b']}: "
                f"{p['only_b_right']}",
            ]
        return "\n".join([*lines, f"Wrote {', '.join(self.images_written)}"])


@dataclass
class AuditResult(DatasetFacts):
    """Audit mode (``audit.py``): suspected label errors, unusable images, copies under two classes."""

    mode: ClassVar[str] = "audit"
    dataset_path: str
    class_names: list[str]
    images: dict[str, int]
    skipped: list[dict]
    audited_images: int
    image_size: int
    folds: int
    label_issues: list[dict]  # file, given, suggested, score, p_given, p_suggested, fold; worst first
    image_issues: list[dict]  # file, problems
    mixed_copies: list[list[str]]
    minutes: float
    duplicates: dict | None = None
    imbalance: float | None = None
    images_written: list[str] = field(default_factory=list)

    def human(self) -> str:
        share = len(self.label_issues) / max(1, self.audited_images)
        return (
            f"Audit of {self.dataset_path}: {len(self.label_issues)} suspected label errors in {self.audited_images} images "
            f"({share:.1%}), {len(self.image_issues)} unusable images, {len(self.mixed_copies)} pictures filed under "
            f"different classes ({self.folds} folds at {self.image_size} pixels, {self.minutes:g} min); "
            f"wrote {', '.join(self.images_written)}"
        )


@dataclass
class ExportResult(Result):
    mode: ClassVar[str] = "export"
    format: str
    model_file_path: str
    written: list[str]
    quantization: dict | None = None  # --quantize: {"float32": {...}, "int8": {...}}, export.measure()'s figures

    def human(self) -> str:
        lines = [f"Exported {self.format}: {', '.join(self.written)}"]
        for kind, m in (self.quantization or {}).items():
            lines.append(
                f"{kind:8s} {m['size_bytes'] / 1e6:6.2f} MB, test accuracy {m['test_accuracy']:.3f} "
                f"({m['test_images']} images), one image {m['latency_ms']:.2f} ms, {m['images_per_second']:.0f} images/s"
            )
        return "\n".join(lines)
