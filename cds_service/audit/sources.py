"""Where the population audit's resources come from: NDJSON files, plain or gzip, as any FHIR Bulk Data exporter
writes them (one resource per line, one or more files per resource type).

``--ndjson`` takes directories and files; this module turns them into a checked list of files before any engine
starts, so a missing or unreadable path is one clear :class:`SourceError` (exit status 3) rather than a failure
half-way through a long run. Bad *lines* are not a source failure: the engines count them per file with the reason
(``engine.SKIP_*``) and go on.

The bundled fixtures (``fhir_fixtures/*.json``, transaction Bundles) are also written here as NDJSON per resource
type, the way a Bulk export of a server holding them would look: the README's quick example, the tests and the
benchmark all audit the same files.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any

#: File names a directory given to ``--ndjson`` contributes (Bulk Data servers write ``.ndjson``; some tools write
#: ``.jsonl``; either may be gzip-compressed).
NDJSON_SUFFIXES: tuple[str, ...] = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
GZIP_MAGIC = b"\x1f\x8b"

#: A line longer than this is not read (a FHIR resource with inline attachments can reach megabytes; a "line" of
#: hundreds of megabytes is a broken file): it is skipped and counted with this reason.
MAX_LINE_BYTES = 16 * 1024 * 1024
SKIP_TOO_LONG = "line-too-long"


class SourceError(Exception):
    """The audit's input cannot be read (a missing or unreadable path, a broken gzip stream, a failed export): the
    command says which and exits with status 3. Messages name paths, never file contents."""


def is_ndjson_name(name: str) -> bool:
    """Whether a file name is one a directory of NDJSON contributes (``*.ndjson``, ``*.jsonl``, gzip or not)."""
    return not name.startswith(".") and name.lower().endswith(NDJSON_SUFFIXES)


def _check_readable(path: Path, shown: str) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError as exc:
        raise SourceError(f"{shown}: cannot read the file ({exc.strerror or type(exc).__name__}) — check its "
                          "permissions") from exc
    if path.name.lower().endswith(".gz") and head and head != GZIP_MAGIC:
        raise SourceError(f"{shown}: named .gz but not gzip-compressed — rename it or compress it")


def resolve_ndjson(paths: Sequence[str | os.PathLike[str]], *, option: str = "--ndjson") -> list[str]:
    """The NDJSON files named by ``paths`` (directories contribute their ``NDJSON_SUFFIXES`` files, not
    recursively, hidden files left out; files are taken as given), absolute, de-duplicated, in a stable order.

    Raises :class:`SourceError` for an empty list, a path that does not exist or cannot be read, and a directory
    with no NDJSON file — before any work starts."""
    if not paths:
        raise SourceError(f"{option}: no path given — name a directory of .ndjson files or the files")
    found: list[str] = []
    seen: set[str] = set()
    for raw in paths:
        text = os.fspath(raw)
        shown = f"{option} {text!r}" if not text.isprintable() or not text.strip() else f"{option} {text}"
        if not text.strip():
            raise SourceError(f"{shown}: empty path — name a directory of .ndjson files or the files")
        path = Path(text)
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except (OSError, ValueError) as exc:
            raise SourceError(f"{shown}: not a usable path ({type(exc).__name__})") from exc
        if not exists:
            raise SourceError(f"{shown}: not found — check the path")
        if is_dir:
            try:
                names = sorted(entry.name for entry in os.scandir(path) if entry.is_file() and is_ndjson_name(
                    entry.name))
            except OSError as exc:
                raise SourceError(f"{shown}: cannot list the directory ({exc.strerror or type(exc).__name__})") \
                    from exc
            if not names:
                raise SourceError(f"{shown}: no {', '.join('*' + s for s in NDJSON_SUFFIXES)} file in this "
                                  "directory")
            members = [path / name for name in names]
        else:
            members = [path]
        for member in members:
            _check_readable(member, f"{option} {member}" if is_dir else shown)
            resolved = str(member.resolve())
            if resolved not in seen:
                seen.add(resolved)
                found.append(resolved)
    return found


def open_lines(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The raw lines of one NDJSON file (gzip by name), as bytes, without holding the file in memory."""
    name = os.fspath(path)
    opener = gzip.open if name.lower().endswith(".gz") else open
    with opener(name, "rb") as handle:  # type: ignore[operator]
        yield from handle


# -- the bundled fixtures as a Bulk export -------------------------------------------------------------------------
def fixture_bundles() -> list[tuple[str, dict[str, Any]]]:
    """The transaction Bundles of the ``fhir_fixtures`` package, in file-name order (the shared practice first)."""
    folder = resources.files("fhir_fixtures")
    bundles = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json") and entry.name != "scenarios.json":
            document = json.loads(entry.read_text("utf-8"))
            if isinstance(document, dict) and document.get("resourceType") == "Bundle":
                bundles.append((entry.name, document))
    return bundles


def bundle_resources(bundles: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Every entry's resource of the given Bundles, in order."""
    for _, bundle in bundles:
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
                yield resource


def _open_text(path: Path, compress: bool) -> IO[str]:
    if compress:
        return gzip.open(path, "wt", encoding="utf-8")
    return path.open("w", encoding="utf-8")


def write_ndjson_by_type(resources_: Iterable[dict[str, Any]], out_dir: str | os.PathLike[str], *,
                         compress: bool = False) -> list[Path]:
    """Write resources as ``{Type}.ndjson`` (``.ndjson.gz`` with ``compress``) in ``out_dir``, one compact JSON
    per line, in the order given — the layout of a Bulk Data export. Returns the files, sorted."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for resource in resources_:
            rtype = resource["resourceType"]
            handle = handles.get(rtype)
            if handle is None:
                name = folder / f"{rtype}.ndjson{'.gz' if compress else ''}"
                handle = stack.enter_context(_open_text(name, compress))
                handles[rtype] = handle
            handle.write(json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n")
    return sorted(folder / f"{rtype}.ndjson{'.gz' if compress else ''}" for rtype in handles)


def fixtures_to_ndjson(out_dir: str | os.PathLike[str], *, compress: bool = False) -> list[Path]:
    """The bundled fixtures as a Bulk export would write them: one NDJSON file per resource type in ``out_dir``.
    Used by the README's quick example, the tests and the benchmark, so they all audit the same bytes."""
    return write_ndjson_by_type(bundle_resources(fixture_bundles()), out_dir, compress=compress)
