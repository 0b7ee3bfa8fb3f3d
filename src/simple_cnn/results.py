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


def answer(top_k: list[dict], min_confidence: float) -> str:
    """The most likely class, or "unknown" when its probability is below ``min_confidence``."""
    return top_k[0]["class"] if top_k[0]["probability"] >= min_confidence else UNKNOWN


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
class TrainResult(Result):
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


@dataclass
class TestResult(Result):
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
                self.report.rstrip(),
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

    @property
    def answer(self) -> str:
        return answer(self.top_k, self.min_confidence)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "image": self.image,
            "model_file_path": self.model_file_path,
            "runtime": self.runtime,
            "class": self.answer,
            "probability": self.top_k[0]["probability"],
            "top_k": self.top_k,
        } | ({"explanation": self.explanation} if self.explanation else {})

    def human(self) -> str:
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in self.top_k)
        first = self.top_k[0]
        if self.answer == UNKNOWN:
            best = f"{first['class']}, has {first['probability']:.3f} < {self.min_confidence:g}"
            head = f"{self.image}: unknown (the most likely, {best})"
        else:
            head = f"{self.image}: {first['class']} (probability {first['probability']:.3f})"
        where = f"\nWhere it looked (Grad-CAM): {self.explanation}" if self.explanation else ""
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
            rows.append(f"{r['image']}\t{r['class']}\t{r['probability']:.3f}\t{top}{where}")
        return "\n".join(rows)

    def notes(self) -> list[str]:
        where = f", written to {self.output}" if self.output else ""
        return [f"skipped {s['file']}: {s['reason']}" for s in self.skipped] + [
            f"Classified {len(self.predictions)} images ({self.images_per_second} images/s, "
            f"{self.runtime}){where}; {len(self.skipped)} skipped"
        ]


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
