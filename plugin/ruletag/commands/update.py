"""``ruletag rules update``: fetch upstream rule packages into versioned folders, verify them,
switch a ``current`` link atomically, and roll back.

Layout under ``--dest DIR``, one folder per source (``sigma``, ``elastic``)::

    DIR/<source>/versions/<UTC time>-<sha256 prefix>/   one unpacked package each
    DIR/<source>/current -> versions/<...>              the link a pipeline config points at

A download is streamed to a temporary file (size-capped, its sha256 computed on the way),
checked (``--sha256``; zip CRCs or the whole gzip stream read; every member name: no absolute
path, no ``..``, no link leaving the package; member count, file size, total size and
compression ratio capped against archive bombs), unpacked into a hidden staging folder and
loaded with the rule loader. A damaged package, or one where not a single rule loads, is
refused and ``current`` is left alone. Otherwise the staging folder becomes a version, a new
symlink is made under a temporary name and ``os.replace``\\ d over ``current`` (atomic), and
versions beyond ``--keep`` are deleted (the live one never). ``--rollback`` points ``current``
at the version before it.

Each version holds ``.ruletag-version.json`` (hidden, so the loader skips it): where it came
from, its load counts and a digest per rule id, from which the change counts are printed.

Downloads go through ``urllib``, so ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` apply, and a
``file://`` URL reads a package brought in by hand. A running relay whose rule path is the
``current`` link sees new file modification times (the files are unpacked afresh) and reloads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ruletag.rules.loader import RULE_SUFFIXES, load_rules

SIGMA_PACKAGES = {
    "core": "sigma_core.zip",
    "core+": "sigma_core+.zip",
    "all": "sigma_all_rules.zip",
}
SIGMA_URL = "https://github.com/SigmaHQ/sigma/releases/latest/download/{asset}"
ELASTIC_URL = "https://github.com/elastic/detection-rules/archive/refs/heads/main.tar.gz"
SOURCES = ("sigma", "elastic")

MANIFEST = ".ruletag-version.json"
_KEEP_STEMS = ("license", "notice", "readme", "copying")
#: Top folders of Elastic's repository that hold rules (the rest is tooling and tests).
_ELASTIC_RULE_DIRS = ("rules", "rules_building_block")
_CHUNK = 1 << 16


class UpdateError(Exception):
    """A package refused (download, integrity, safety or load failure); ``current`` kept."""


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile or broken archive from filling the disk."""

    download: int = 1 << 30  # bytes fetched
    total: int = 2 << 30  # bytes unpacked, all members
    file: int = 64 << 20  # bytes of one member
    members: int = 200_000
    ratio: int = 200  # unpacked / compressed, for members over 1 MiB


# --------------------------------------------------------------------------- download


def default_url(source: str, package: str = "core") -> str:
    if source == "sigma":
        return SIGMA_URL.format(asset=SIGMA_PACKAGES[package])
    return ELASTIC_URL


def download(url: str, into: IO[bytes], limits: Limits, timeout: float = 60.0) -> str:
    """Stream ``url`` into ``into``; the sha256 hex digest of what was read."""
    req = urllib.request.Request(url, headers={"User-Agent": "ruletag-rules-update"})
    h = hashlib.sha256()
    n = 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                n += len(chunk)
                if n > limits.download:
                    raise UpdateError(f"{url}: larger than {limits.download} bytes, refused")
                h.update(chunk)
                into.write(chunk)
    except urllib.error.HTTPError as exc:
        raise UpdateError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UpdateError(f"{url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise UpdateError(f"{url}: {exc}") from exc
    if n == 0:
        raise UpdateError(f"{url}: empty download")
    return h.hexdigest()


# --------------------------------------------------------------------------- archives


def _parts(name: str) -> tuple[str, ...]:
    """A member name as safe relative path parts; UpdateError for absolute or ``..`` names."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UpdateError(f"archive entry with an absolute path refused: {name!r}")
    parts = tuple(p for p in PurePosixPath(norm).parts if p not in ("", "."))
    if ".." in parts:
        raise UpdateError(f"archive entry leaving the package refused: {name!r}")
    if any("\0" in p for p in parts):
        raise UpdateError(f"archive entry with a NUL byte refused: {name!r}")
    return parts


def _check_link(name: str, target: str) -> None:
    """A link member must stay inside the package (it is then skipped, never created)."""
    parts = _parts(name)
    norm = target.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UpdateError(f"archive link to an absolute path refused: {name!r} -> {target!r}")
    depth = len(parts) - 1
    for p in PurePosixPath(norm).parts:
        depth += -1 if p == ".." else (0 if p in ("", ".") else 1)
        if depth < 0:
            raise UpdateError(f"archive link leaving the package refused: {name!r} -> {target!r}")


@dataclass
class _Member:
    parts: tuple[str, ...]
    size: int
    open: Callable[[], IO[bytes]]
    compressed: int = 0


def _zip_members(zf: zipfile.ZipFile, limits: Limits) -> Iterator[_Member]:
    infos = zf.infolist()
    if len(infos) > limits.members:
        raise UpdateError(f"archive has more than {limits.members} entries, refused")
    total = 0
    for info in infos:  # the declared sizes first: a bomb is refused before inflating it
        total += info.file_size
        if info.file_size > limits.file:
            raise UpdateError(f"archive entry larger than {limits.file} bytes: {info.filename!r}")
        if info.file_size > (1 << 20) and info.file_size > info.compress_size * limits.ratio:
            raise UpdateError(f"archive entry compressed more than {limits.ratio}:1")
        if total > limits.total:
            raise UpdateError(f"archive unpacks to more than {limits.total} bytes, refused")
    bad = zf.testzip()  # reads every member: CRC and decompression errors
    if bad is not None:
        raise UpdateError(f"archive damaged: bad CRC in {bad!r}")
    for info in infos:
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _check_link(info.filename, zf.read(info).decode("utf-8", "replace"))
            continue
        parts = _parts(info.filename)
        if info.is_dir() or not parts:
            continue
        yield _Member(
            parts, info.file_size, functools.partial(zf.open, info), info.compress_size or 1
        )


def _tar_members(tf: tarfile.TarFile, limits: Limits) -> Iterator[_Member]:
    count = 0
    total = 0
    for m in tf:
        count += 1
        if count > limits.members:
            raise UpdateError(f"archive has more than {limits.members} entries, refused")
        if m.issym():
            _check_link(m.name, m.linkname)
            continue
        if m.islnk():  # a hard link names another member, from the archive's root
            _parts(m.linkname)
            continue
        parts = _parts(m.name)
        if not m.isfile() or not parts:
            continue  # folders, devices, fifos
        total += m.size
        if total > limits.total:
            raise UpdateError(f"archive unpacks to more than {limits.total} bytes, refused")

        def opener(m: tarfile.TarInfo = m) -> IO[bytes]:
            f = tf.extractfile(m)
            if f is None:
                raise UpdateError(f"archive entry unreadable: {m.name!r}")
            return f

        yield _Member(parts, m.size, opener)
    assert tf.fileobj is not None
    while tf.fileobj.read(_CHUNK):  # to the end of the stream: gzip checks its CRC there
        total += _CHUNK
        if total > limits.total + limits.download:
            raise UpdateError("archive trailer too large, refused")


@contextlib.contextmanager
def _open_archive(path: Path, limits: Limits) -> Iterator[Iterator[_Member]]:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    try:
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as zf:
                yield _zip_members(zf, limits)
        else:
            with tarfile.open(path, "r:*") as tf:
                yield _tar_members(tf, limits)
    except UpdateError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UpdateError(f"archive damaged or not a zip/tar archive: {exc}") from exc
    except (ValueError, RuntimeError, NotImplementedError) as exc:  # odd zip methods, encryption
        raise UpdateError(f"archive unreadable: {exc}") from exc


def _wanted(parts: tuple[str, ...]) -> bool:
    stem, suffix = os.path.splitext(parts[-1])
    return suffix.lower() in RULE_SUFFIXES or stem.lower().startswith(_KEEP_STEMS)


def extract(archive: Path, into: Path, source: str, limits: Limits) -> int:
    """Unpack the rule files (and license texts) of ``archive`` into ``into``; file count.

    A single top folder (as in GitHub's branch archives) is dropped. For Elastic, when the
    package has a ``rules/`` folder, only ``rules/`` and ``rules_building_block/`` are kept.
    """
    try:
        with _open_archive(archive, limits) as members:
            files = list(members)  # every name is checked before anything is written
            if not files:
                raise UpdateError("archive holds no files")
            tops = {m.parts[0] for m in files}
            strip = 1 if len(tops) == 1 and all(len(m.parts) > 1 for m in files) else 0
            rel = [(m.parts[strip:], m) for m in files]
            if source == "elastic" and any(p[0] == "rules" and len(p) > 1 for p, _ in rel):
                rel = [
                    (p, m)
                    for p, m in rel
                    if (p[0] in _ELASTIC_RULE_DIRS and len(p) > 1)
                    or (len(p) == 1 and p[0].lower().startswith(_KEEP_STEMS))
                ]
            rel = [(p, m) for p, m in rel if _wanted(p) and not any(x.startswith(".") for x in p)]
            total = 0
            for p, m in rel:
                if m.size > limits.file:
                    raise UpdateError(f"archive entry larger than {limits.file} bytes: {p[-1]!r}")
                if m.compressed and m.size > (1 << 20) and m.size > m.compressed * limits.ratio:
                    raise UpdateError(f"archive entry compressed more than {limits.ratio}:1")
                total += m.size
                if total > limits.total:
                    raise UpdateError(f"archive unpacks to more than {limits.total} bytes")
            written = 0
            for p, m in rel:
                target = into.joinpath(*p)
                target.parent.mkdir(parents=True, exist_ok=True)
                n = 0
                with m.open() as src, open(target, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        n += len(chunk)
                        written += len(chunk)
                        if n > limits.file or written > limits.total:
                            raise UpdateError(f"archive entry {p[-1]!r} larger than announced")
                        dst.write(chunk)
    except UpdateError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UpdateError(f"archive damaged: {exc}") from exc
    return len(rel)


# --------------------------------------------------------------------------- versions


def _versions(source_dir: Path) -> list[str]:
    folder = source_dir / "versions"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def current_version(source_dir: Path) -> str | None:
    link = source_dir / "current"
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def _switch(source_dir: Path, version: str) -> None:
    """Point ``current`` at ``versions/<version>``: a new link renamed over the old one."""
    link = source_dir / "current"
    if link.exists() and not link.is_symlink():
        raise UpdateError(f"{link} exists and is not a link: move it away first")
    tmp = source_dir / f".current.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.join("versions", version), tmp)
    os.replace(tmp, link)


def _manifest(version_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((version_dir / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, int]:
    """Rules added, removed and changed (same id, other file content) between two manifests."""
    a: dict[str, str] = old.get("rules", {})
    b: dict[str, str] = new.get("rules", {})
    return {
        "added": len(b.keys() - a.keys()),
        "removed": len(a.keys() - b.keys()),
        "changed": sum(1 for k in a.keys() & b.keys() if a[k] != b[k]),
    }


def _prune(source_dir: Path, keep: int) -> list[str]:
    current = current_version(source_dir)
    names = _versions(source_dir)
    old = [n for n in names[: max(0, len(names) - keep)] if n != current]
    for n in old:
        shutil.rmtree(source_dir / "versions" / n, ignore_errors=True)
    for stale in (source_dir / "versions").glob(".staging-*"):  # left by a killed update
        shutil.rmtree(stale, ignore_errors=True)
    return old


@contextlib.contextmanager
def _locked(source_dir: Path) -> Iterator[None]:
    source_dir.mkdir(parents=True, exist_ok=True)
    with open(source_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UpdateError(f"{source_dir}: another update is running") from exc
        yield


def _verify(staging: Path) -> dict[str, Any]:
    """Load every rule file of ``staging``; the manifest's counts and per-rule digests."""
    result = load_rules([staging])
    if not result.rules:
        why = f"{result.files} rule files, {len(result.problems)} could not be loaded"
        raise UpdateError(f"no rule in the package could be loaded ({why})")
    digests: dict[str, str] = {}
    rules: dict[str, str] = {}
    for r in result.rules:
        d = digests.get(r.path)
        if d is None:
            try:
                d = digests[r.path] = hashlib.sha256(Path(r.path).read_bytes()).hexdigest()[:16]
            except OSError:
                d = ""
        rules[r.id] = d
    return {
        "files": result.files,
        "loaded": len(result.rules),
        "unsupported": len(result.unsupported),
        "invalid": len(result.invalid),
        "rules": rules,
    }


@dataclass
class Outcome:
    source: str
    version: str
    previous: str | None
    manifest: dict[str, Any]
    changes: dict[str, int]
    unchanged: bool = False
    pruned: tuple[str, ...] = ()

    def describe(self) -> str:
        m = self.manifest
        if self.unchanged:
            return f"{self.source}: already current ({self.version}), nothing changed"
        counts = (
            f"{m.get('files', 0)} rule files: {m.get('loaded', 0)} rules loaded, "
            f"{m.get('unsupported', 0)} unsupported, {m.get('invalid', 0)} invalid"
        )
        c = self.changes
        vs = (
            f"; vs {self.previous}: +{c['added']} added, -{c['removed']} removed, "
            f"{c['changed']} changed"
            if self.previous
            else "; first version"
        )
        pruned = f"; removed old versions {', '.join(self.pruned)}" if self.pruned else ""
        return f"{self.source}: current -> versions/{self.version}: {counts}{vs}{pruned}"


def update(
    dest: Path,
    source: str,
    url: str,
    *,
    sha256: str | None = None,
    keep: int = 3,
    limits: Limits | None = None,
    timeout: float = 60.0,
) -> Outcome:
    """Fetch, verify and switch one source's package (see the module doc)."""
    limits = limits or Limits()
    source_dir = dest / source
    with _locked(source_dir):
        versions = source_dir / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        previous = current_version(source_dir)
        staging = Path(tempfile.mkdtemp(dir=versions, prefix=".staging-"))
        try:
            archive = staging / ".archive"
            with open(archive, "wb") as fh:
                digest = download(url, fh, limits, timeout)
            if sha256 and digest.lower() != sha256.strip().lower():
                raise UpdateError(f"{url}: sha256 {digest} does not match --sha256 {sha256}")
            if previous and previous.endswith("-" + digest[:12]) and (versions / previous).is_dir():
                return Outcome(
                    source, previous, previous, _manifest(versions / previous), {}, unchanged=True
                )
            pkg = staging / "pkg"
            pkg.mkdir()
            extract(archive, pkg, source, limits)
            archive.unlink()
            manifest = _verify(pkg)
            now = dt.datetime.now(dt.UTC)
            manifest.update(url=url, sha256=digest, fetched=now.isoformat())
            (pkg / MANIFEST).write_text(json.dumps(manifest, indent=1), "utf-8")
            name = f"{now:%Y%m%dT%H%M%S.%fZ}-{digest[:12]}"
            os.rename(pkg, versions / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        old = _manifest(versions / previous) if previous else {}
        _switch(source_dir, name)
        pruned = _prune(source_dir, max(1, keep))
        return Outcome(
            source, name, previous, manifest, changes(old, manifest), pruned=tuple(pruned)
        )


def rollback(dest: Path, source: str) -> Outcome:
    """Point ``current`` at the version before it."""
    source_dir = dest / source
    with _locked(source_dir):
        names = _versions(source_dir)
        cur = current_version(source_dir)
        if cur is None or cur not in names:
            raise UpdateError(f"{source_dir}: no current version to roll back from")
        i = names.index(cur)
        if i == 0:
            raise UpdateError(f"{source_dir}: no version before {cur} is kept")
        prev = names[i - 1]
        _switch(source_dir, prev)
        versions = source_dir / "versions"
        old, new = _manifest(versions / cur), _manifest(versions / prev)
        return Outcome(source, prev, cur, new, changes(old, new))


# --------------------------------------------------------------------------- command


def main_update(ns: argparse.Namespace) -> int:
    """``ruletag rules update``: every chosen source; exit 1 if one was refused."""
    chosen = [s for s in SOURCES if getattr(ns, s, False)] or list(SOURCES)
    if ns.url and len(chosen) != 1:
        print("ruletag: --url needs exactly one of --sigma or --elastic", file=sys.stderr)
        return 2
    dest = Path(ns.dest)
    failed = 0
    for source in chosen:
        try:
            if ns.rollback:
                out = rollback(dest, source)
                c = out.changes
                print(
                    f"{source}: rolled back: current -> versions/{out.version} (was "
                    f"{out.previous}): +{c['added']} added, -{c['removed']} removed, "
                    f"{c['changed']} changed"
                )
                continue
            url = ns.url or default_url(source, ns.sigma_package)
            print(f"{source}: fetching {url}", file=sys.stderr)
            out = update(dest, source, url, sha256=ns.sha256, keep=ns.keep, timeout=ns.timeout)
            print(out.describe())
        except UpdateError as exc:
            failed += 1
            cur = current_version(dest / source)
            print(
                f"ruletag: {source}: refused: {exc} (current "
                f"{'still ' + cur if cur else 'not set'})",
                file=sys.stderr,
            )
    return 1 if failed else 0
