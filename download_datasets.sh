#!/usr/bin/env bash
# Download the example datasets into datasets/, verified, and create models/ and images/.
# Run ./download_datasets.sh --help for usage.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./download_datasets.sh [all|animals|flowers|digits]...

Creates datasets/, models/ and images/ beside this script and puts the chosen datasets
in datasets/ (default: all):
  animals   datasets/Animals/{cats,dogs,snakes}    Kaggle borhanitrash/animal-image-classification-dataset
  flowers   datasets/flower_photos/{daisy,...}     TensorFlow's flower_photos (218 MiB)
  digits    datasets/digits/{0,...,9}              scikit-learn's digits, written locally (no network)

Every download is verified before it is unpacked: flower_photos against its published
SHA-256; the Animals archive, which has no published checksum, against the SHA-256
recorded in datasets/.checksums on its first download (recorded only once that archive
unpacked into a complete dataset). A dataset already present is not downloaded again;
delete its folder to fetch it anew. Downloads are bounded in size and stop when they
stall; redirects to plain http are refused; what a killed run left is cleaned up.

Environment (for mirrors and tests):
  SIMPLE_CNN_DATASETS_BASE_URL  fetch <base>/flower_photos.tgz and
                                <base>/animal-image-classification-dataset.zip instead
  SIMPLE_CNN_FLOWERS_SHA256     expected SHA-256 of flower_photos.tgz
  SIMPLE_CNN_MAX_DOWNLOAD_MB    largest archive accepted, in MiB (default 4096)
  SIMPLE_CNN_STALL_SECONDS      give up when under 1 KiB/s for this long (default 60)
  SIMPLE_CNN_MAX_UNPACKED_MB    refuse an archive that would unpack to more (default 8192), or to
                                more than 100 times its own size (a "zip bomb")
  SIMPLE_CNN_MAX_FILES          refuse an archive of more files (default 1000000)
  PYTHON                        Python with simple_cnn's requirements (default: .venv/bin/python, else python3)

Exit codes: 0 done, 1 a download or verification failed (nothing half-done is left), 2 usage.
EOF
}

FLOWERS_URL=https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz
FLOWERS_SHA256=4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c
ANIMALS_URL=https://www.kaggle.com/api/v1/datasets/download/borhanitrash/animal-image-classification-dataset
if [ -n "${SIMPLE_CNN_DATASETS_BASE_URL:-}" ]; then
  FLOWERS_URL=$SIMPLE_CNN_DATASETS_BASE_URL/flower_photos.tgz
  ANIMALS_URL=$SIMPLE_CNN_DATASETS_BASE_URL/animal-image-classification-dataset.zip
fi
FLOWERS_SHA256=${SIMPLE_CNN_FLOWERS_SHA256:-$FLOWERS_SHA256}
MAX_MB=${SIMPLE_CNN_MAX_DOWNLOAD_MB:-4096}
STALL_SECONDS=${SIMPLE_CNN_STALL_SECONDS:-60}
MAX_UNPACKED_MB=${SIMPLE_CNN_MAX_UNPACKED_MB:-8192}
MAX_FILES=${SIMPLE_CNN_MAX_FILES:-1000000}

say() { printf '%s\n' "$*"; }
fail() { printf 'download_datasets.sh: error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "$0")"
ROOT=$PWD
MANIFEST=$ROOT/datasets/.checksums
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

WORK=""
cleanup() { if [ -n "$WORK" ]; then rm -rf -- "$WORK"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# safe_extract ARCHIVE DEST: unpack a .tgz or .zip into DEST, refusing absolute paths,
# ".." components, links or special files, and more files or bytes than the bounds
# (from the sizes the archive declares, which bound what is written) before anything is written.
safe_extract() {
  "$PYTHON" - "$1" "$2" "$MAX_UNPACKED_MB" "$MAX_FILES" <<'PY'
import os, sys, tarfile, zipfile
from pathlib import PurePosixPath

archive, dest = sys.argv[1], sys.argv[2]
max_bytes, max_files = int(sys.argv[3]) * 1048576, int(sys.argv[4])

def check_totals(sizes):
    total, packed = sum(sizes), os.path.getsize(archive)
    if len(sizes) > max_files:
        sys.exit(f"the archive holds {len(sizes):,} files, more than {max_files:,} (SIMPLE_CNN_MAX_FILES)")
    if total > max_bytes:
        sys.exit(f"the archive unpacks to {total:,} bytes, more than {max_bytes:,} (SIMPLE_CNN_MAX_UNPACKED_MB)")
    if total > 64 * 1048576 and total > 100 * packed:
        sys.exit(f"the archive unpacks to {total:,} bytes from {packed:,}, over 100 times its size: a zip bomb?")

def check(name, ok_type):
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        sys.exit(f"unsafe path in archive: {name!r}")
    if not ok_type:
        sys.exit(f"link or special file in archive: {name!r}")

try:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                check(info.filename, not is_link)
            check_totals([info.file_size for info in z.infolist()])
            z.extractall(dest)
    else:
        with tarfile.open(archive, "r:*") as t:
            members = t.getmembers()
            for m in members:
                check(m.name, m.isfile() or m.isdir())
            check_totals([m.size for m in members])
            t.extractall(dest, members=members, filter="data")
except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    sys.exit(f"cannot unpack {archive}: {e}")
PY
}

# fetch NAME URL EXPECTED_SHA256 DEST_DIR CLASSES...: download, verify, unpack, move into place.
# EXPECTED_SHA256 empty: compare with (or record in) the manifest.
fetch() {
  local name=$1 url=$2 expected=$3 dest=$4
  shift 4
  local target=$ROOT/datasets/$dest
  if [ -e "$target/.complete" ]; then
    say "$dest: already present in datasets/$dest, not downloaded again"
    return 0
  elif [ -e "$target" ]; then
    fail "datasets/$dest exists but was not completed by this script: move or delete it, then run again"
  fi

  WORK=$(mktemp -d "$ROOT/datasets/.download-$name.XXXXXX")
  say "$dest: downloading $url"
  # --fail: HTTP errors are errors. --retry-all-errors: a dropped or truncated transfer is
  # retried too (plain --retry covers only timeouts and 5xx), 3 times at most.
  # --proto-redir =https: a redirect may only go to https. --speed-limit/--speed-time: a
  # stalled transfer is given up. The size bound is --max-filesize for a declared size
  # and, for a transfer that declares none, the file size limit of the subshell (ulimit).
  if ! (
    ulimit -f $((MAX_MB * 1024))  # bash counts in KiB
    curl --fail --location --silent --show-error --connect-timeout 20 \
      --proto-redir =https --max-filesize $((MAX_MB * 1048576)) \
      --speed-limit 1024 --speed-time "$STALL_SECONDS" \
      --retry 3 --retry-delay 1 --retry-all-errors \
      --output "$WORK/archive" "$url"
  ); then
    fail "$dest: download from $url failed (an HTTP error, a stall, a redirect to plain http, or over $MAX_MB MiB); nothing was changed, run again later"
  fi

  local actual recorded record=""
  actual=$(sha256sum "$WORK/archive" | cut -d' ' -f1)
  if [ -n "$expected" ]; then
    [ "$actual" = "$expected" ] || fail "$dest: checksum mismatch (SHA-256 $actual, expected $expected): the download is damaged or not the published archive; nothing was changed"
    say "$dest: SHA-256 verified against the published checksum"
  else
    recorded=$(awk -v n="$name" '$2 == n {print $1}' "$MANIFEST" 2>/dev/null || true)
    if [ -n "$recorded" ]; then
      [ "$actual" = "$recorded" ] || fail "$dest: checksum mismatch (SHA-256 $actual, recorded $recorded in datasets/.checksums on the first download): the archive changed or is damaged; nothing was changed"
      say "$dest: SHA-256 matches the one recorded on the first download"
    else
      record=$actual  # written only once the dataset is in place: a bad first download is never pinned
    fi
  fi

  mkdir "$WORK/unpacked"
  safe_extract "$WORK/archive" "$WORK/unpacked" || fail "$dest: refused to unpack the archive from $url; nothing was changed"

  # The dataset is the folder holding all the class folders, wherever the archive put it.
  local found="" dir cls all
  while IFS= read -r -d '' dir; do
    all=1
    for cls in "$@"; do [ -d "$dir/$cls" ] || all=0; done
    if [ $all = 1 ]; then found=$dir; break; fi
  done < <(find "$WORK/unpacked" -type d -print0)
  [ -n "$found" ] || fail "$dest: the archive has no folder with the class folders $* inside; nothing was changed"
  touch "$found/.complete"
  mv -T "$found" "$target"
  rm -rf -- "$WORK"
  WORK=""
  if [ -n "$record" ]; then
    say "$dest: no published checksum; recorded SHA-256 $record in datasets/.checksums to check later downloads"
    printf '%s  %s  %s\n' "$record" "$name" "$url" >> "$MANIFEST"
  fi
  say "$dest: ready in datasets/$dest ($(find "$target" -type f ! -name '.*' | wc -l) files)"
}

digits() {
  if [ -d datasets/digits ]; then
    say "digits: already present in datasets/digits"
    return 0
  fi
  PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -c \
    'from simple_cnn.sources import ensure_digits_dataset; ensure_digits_dataset("datasets/digits")' \
    || fail "digits: could not write datasets/digits with $PYTHON (install requirements.txt first)"
  say "digits: ready in datasets/digits (1797 files)"
}

choices=()
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    all|animals|flowers|digits) choices+=("$arg") ;;
    *) printf 'download_datasets.sh: error: unknown dataset %q (see --help)\n' "$arg" >&2; exit 2 ;;
  esac
done
[ ${#choices[@]} -gt 0 ] || choices=(all)

mkdir -p datasets models images
# One run at a time; so what a killed run left (.download-*) can be removed safely.
exec 9>"$ROOT/datasets/.download.lock"
flock -n 9 || fail "another download_datasets.sh is running in $ROOT: wait for it to finish"
for stale in "$ROOT"/datasets/.download-*; do
  if [ -d "$stale" ]; then
    say "removing $(basename "$stale"), left by an interrupted run"
    rm -rf -- "$stale"
  fi
done
for choice in "${choices[@]}"; do
  case $choice in
    all)
      fetch animals "$ANIMALS_URL" "" Animals cats dogs snakes
      fetch flowers "$FLOWERS_URL" "$FLOWERS_SHA256" flower_photos daisy dandelion roses sunflowers tulips
      digits ;;
    animals) fetch animals "$ANIMALS_URL" "" Animals cats dogs snakes ;;
    flowers) fetch flowers "$FLOWERS_URL" "$FLOWERS_SHA256" flower_photos daisy dandelion roses sunflowers tulips ;;
    digits) digits ;;
  esac
done
