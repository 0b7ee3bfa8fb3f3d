"""Does the train command fit in a hard memory limit? The same command inside a memory cgroup and outside it.

    sudo python bench/limit_bench.py --dataset ../shared/datasets/flower_photos-small --limit_mb 1200 \
        -- --backbone MobileNetV3Large --weights none --image_size 128 --epochs 1

Peak RSS (``VmHWM``) counts the pages of files a process maps or has read as well as its own
memory; the kernel can drop those clean file pages and read them again, but never the
process's anonymous memory when there is no swap. A container's limit (``docker run
--memory``, a Kubernetes memory limit) is a memory cgroup: this runs ``--mode train`` once in
a cgroup limited to ``--limit_mb`` (cgroup v2's ``memory.max``, or v1's
``memory.limit_in_bytes``) and once without a limit, taking turns ``--repeats`` times, and
prints for each run whether it finished, its seconds, its peak RSS, its anonymous memory's
peak (``RssAnon``, sampled every 0.2 s) and its validation accuracy. The page cache is
emptied before each run (:func:`drop_caches`). Needs root (a cgroup, the page cache);
arguments after ``--`` go to every train command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V2, V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")


def make_cgroup(limit_bytes: int) -> Path:
    """A new memory cgroup limited to ``limit_bytes`` (swap included where the kernel counts it)."""
    name = f"simple_cnn_limit_bench_{os.getpid()}"
    if (V2 / "cgroup.controllers").is_file():
        group = V2 / name
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group
    group = V1 / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    return group


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def drop_caches() -> None:
    """Empty the page cache before a run. A page is charged to the cgroup that first read it: with
    TensorFlow's libraries already cached from an earlier run, the limited run would not be charged
    for them, and its peak RSS could pass the limit."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def train_once(dataset: str, extra: list[str], work: Path, group: Path | None, timeout: float) -> dict:
    """One train command, in ``group`` when given, killed after ``timeout`` seconds: finished or not, seconds,
    peak RSS, anonymous peak, accuracy."""
    command = [sys.executable, "-m", "simple_cnn", "--mode", "train", "--dataset_path", dataset]
    command += ["--model_file_path", str(work / "m.keras"), "--images_dir", str(work / "images"), "--fresh", "--json", *extra]

    def enter_group():
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    started = time.monotonic()
    with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=work, preexec_fn=enter_group)
        anon = 0
        while True:  # wait4, not poll: the child's own peak RSS comes with its exit status
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _status_kib(proc.pid, "RssAnon"))
            if time.monotonic() - started > timeout:  # a limit that only just fits can thrash instead of failing
                proc.kill()
            time.sleep(0.2)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    row = {"limited": group is not None, "exit_code": code, "seconds": round(seconds, 1), "anon_peak_kib": anon}
    row["peak_rss_kib"] = usage.ru_maxrss
    if code == 0:
        row["val_accuracy"] = json.loads((work / "stdout").read_text())["best_val_accuracy"]
    else:
        row["stderr_tail"] = (work / "stderr").read_text(errors="replace")[-300:]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--limit_mb", type=float, default=1200, help="the cgroup's limit, in millions of bytes")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout_s", type=float, default=1800, help="a run still going after this is killed")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for every train command")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    group = make_cgroup(int(args.limit_mb * 1e6))
    try:
        for repeat in range(args.repeats):
            for limited in (True, False):
                drop_caches()
                with tempfile.TemporaryDirectory() as work:
                    dataset = str(Path(args.dataset).resolve())
                    row = train_once(dataset, extra, Path(work), group if limited else None, args.timeout_s)
                print(json.dumps({"repeat": repeat, "limit_mb": args.limit_mb if limited else None, **row}), flush=True)
    finally:
        group.rmdir()


if __name__ == "__main__":
    main()
