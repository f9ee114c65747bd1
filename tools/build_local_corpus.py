"""A real-text corpus from what is installed on this machine: Python sources and their documentation.

    python tools/build_local_corpus.py --output data/local/train.jsonl --heldout data/local/heldout.jsonl \\
        --max-bytes 200000000 --heldout-fraction 0.01

Walks the standard library and site-packages (`sysconfig` paths, or `--roots`) for .py/.rst/.md/.txt
files and writes JSONL records `{"text": ..., "source": "<root label>/<relative path>"}`. Files are taken
in the order of a hash of their relative path (a deterministic shuffle, so `--max-bytes` keeps a sample
of every package rather than the alphabetically first ones) and split by a second hash of the same path:
a file is wholly in the held-out set or wholly in the training set. The output depends only on the
installed files, so machines with the same packages get the same corpus. Skipped: files over
`--max-file-bytes` or under 100 bytes, binary (NUL bytes) or non-UTF-8 files, minified or generated ones
(a line over 1000 characters, or 200 on average), and exact duplicates of a file already taken.
"""

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

SUFFIXES = (".py", ".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules"}
MIN_FILE_BYTES = 100
MAX_LINE_CHARS = 1000
MAX_MEAN_LINE_CHARS = 200


def default_roots() -> list[tuple[str, str]]:
    """(label, directory) of the standard library and site-packages, each directory once."""
    paths = sysconfig.get_paths()
    roots = []
    for label, key in (("stdlib", "stdlib"), ("site-packages", "purelib"), ("platlib", "platlib")):
        path = os.path.realpath(paths[key])
        if os.path.isdir(path) and path not in (r for _, r in roots):
            roots.append((label, path))
    return roots


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def is_heldout(source: str, fraction: float) -> bool:
    """Whether the file `source` (its relative path) belongs to the held-out split."""
    return _hash("heldout:" + source) < fraction * 2**64


def candidate_files(roots: Sequence[tuple[str, str]], max_file_bytes: int) -> list[tuple[str, str]]:
    """(source, absolute path) of every text file of the right suffix and size, in hash order. A root
    nested in another (site-packages inside the stdlib folder) is walked once, under its own label."""
    found = []
    root_dirs = {path for _, path in roots}
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                                 and os.path.join(dirpath, d) not in root_dirs)
            for name in filenames:
                if not name.endswith(SUFFIXES):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue
                if MIN_FILE_BYTES <= size <= max_file_bytes:
                    found.append((f"{label}/{os.path.relpath(path, root).replace(os.sep, '/')}", path))
    found.sort(key=lambda item: (_hash(item[0]), item[0]))
    return found


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it is binary, not UTF-8, or minified/generated."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.splitlines()
    if not lines or max(map(len, lines)) > MAX_LINE_CHARS or len(text) / len(lines) > MAX_MEAN_LINE_CHARS:
        return None
    return text if text.strip() else None


def _texts(files, workers: int) -> Iterator[tuple[str, Optional[str]]]:
    """(source, text or None) in the order of `files`, read by a thread pool (file reads and decoding
    release the GIL), a bounded window ahead of the consumer."""
    window = max(64, 16 * workers)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), window):
            part = files[start:start + window]
            yield from zip((source for source, _ in part), pool.map(read_text, (path for _, path in part)))


def build_local_corpus(output: str, heldout_output: str, max_bytes: int = 200_000_000,
                       heldout_fraction: float = 0.01, roots: Optional[Sequence[tuple[str, str]]] = None,
                       max_file_bytes: int = 1_000_000, workers: Optional[int] = None) -> dict:
    """Writes the training and held-out JSONL files (atomically); returns counts of files and bytes.

    `max_bytes` caps the UTF-8 bytes of both splits together (the file crossing it is the last one); a
    machine with less text gives less (`reached_max_bytes` False).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 and 1")
    roots = list(roots or default_roots())
    files = candidate_files(roots, max_file_bytes)
    if not files:
        raise ValueError(f"no {'/'.join(SUFFIXES)} files under {[path for _, path in roots]}")
    stats = {"roots": {label: path for label, path in roots}, "candidates": len(files), "skipped": 0,
             "duplicates": 0, "train_files": 0, "train_bytes": 0, "heldout_files": 0, "heldout_bytes": 0,
             "reached_max_bytes": False}
    seen, total = set(), 0
    tmp = {p: f"{p}.tmp-{os.getpid()}" for p in (output, heldout_output)}
    for path in tmp:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    try:
        with open(tmp[output], "w", encoding="utf-8") as train, \
                open(tmp[heldout_output], "w", encoding="utf-8") as held:
            for source, text in _texts(files, workers or min(16, os.cpu_count() or 1)):
                if text is None:
                    stats["skipped"] += 1
                    continue
                digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if digest in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(digest)
                split = "heldout" if is_heldout(source, heldout_fraction) else "train"
                size = len(text.encode())
                (held if split == "heldout" else train).write(json.dumps({"text": text, "source": source}) + "\n")
                stats[f"{split}_files"] += 1
                stats[f"{split}_bytes"] += size
                total += size
                if total >= max_bytes:
                    stats["reached_max_bytes"] = True
                    break
        if not stats["train_files"] or not stats["heldout_files"]:
            raise ValueError(f"the corpus has {stats['train_files']} training and {stats['heldout_files']} "
                             f"held-out files: raise max_bytes ({max_bytes}) or heldout_fraction ({heldout_fraction})")
        for final, temporary in tmp.items():
            os.replace(temporary, final)
    finally:
        for temporary in tmp.values():
            if os.path.exists(temporary):
                os.remove(temporary)
    return stats


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="training split (.jsonl)")
    p.add_argument("--heldout", required=True, help="held-out split (.jsonl)")
    p.add_argument("--max-bytes", type=int, default=200_000_000, help="cap on the text bytes of both splits")
    p.add_argument("--heldout-fraction", type=float, default=0.01, help="share of files held out")
    p.add_argument("--max-file-bytes", type=int, default=1_000_000, help="larger files are skipped")
    p.add_argument("--roots", nargs="+", metavar="DIR", help="folders to walk (default: stdlib and site-packages)")
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: cores, at most 16)")
    args = p.parse_args(argv)
    roots = [(os.path.basename(os.path.normpath(d)), os.path.realpath(d)) for d in args.roots] if args.roots else None
    try:
        stats = build_local_corpus(args.output, args.heldout, args.max_bytes, args.heldout_fraction, roots,
                                   args.max_file_bytes, args.workers)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
