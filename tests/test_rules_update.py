"""``ruletag rules update``: packages built from the pinned corpus sample, served by a local
HTTP server on 127.0.0.1 (never the internet); versions, the ``current`` link, rollback,
and every refusal (damaged, sha256 mismatch, path traversal, links, bombs, nothing loads)."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ruletag.cli import main
from ruletag.commands.update import Limits, UpdateError, current_version, update
from ruletag.runtime.reload import fingerprint
from support.paths import SAMPLE

SIGMA = SAMPLE / "sigma"
ELASTIC = SAMPLE / "elastic"

BAD_RULE = "title: broken\ndetection: [not, a, map]\n"


def sigma_files() -> dict[str, bytes]:
    """The sample's Sigma package as archive name -> bytes."""
    return {
        str(p.relative_to(SIGMA)): p.read_bytes() for p in sorted(SIGMA.rglob("*")) if p.is_file()
    }


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tgz(
    files: dict[str, bytes],
    links: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
        for name, target in (hardlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)


def run(*args: str) -> int:
    return main(["rules", "update", *args])


def test_update_second_update_and_rollback(
    web: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = web
    dest = tmp_path / "rules"
    files = sigma_files()
    (root / "v1.zip").write_bytes(make_zip(files))
    assert run("--sigma", "--url", f"{base}/v1.zip", "--dest", str(dest)) == 0
    out = capsys.readouterr().out
    assert "sigma: current -> versions/" in out and "first version" in out
    v1 = current_version(dest / "sigma")
    assert v1 is not None and (dest / "sigma" / "current").is_symlink()
    assert list((dest / "sigma" / "current").rglob("*.yml"))
    assert not list((dest / "sigma" / "versions").glob(".staging-*"))

    # Same bytes again: nothing to do.
    assert run("--sigma", "--url", f"{base}/v1.zip", "--dest", str(dest)) == 0
    assert "already current" in capsys.readouterr().out

    # v2: one rule file removed, one added (a copy under a new id), one changed.
    names = sorted(n for n in files if n.endswith(".yml"))
    removed, changed = names[0], names[1]
    v2 = dict(files)
    del v2[removed]
    v2[changed] = v2[changed].replace(b"\ndescription:", b"\ndescription: (edited)", 1)
    new_rule = re.sub(rb"\nid: \S+", b"\nid: 12345678-1234-4234-8234-123456789abc", files[changed])
    v2["rules/new/added.yml"] = new_rule
    (root / "v2.zip").write_bytes(make_zip(v2))
    before = fingerprint([dest / "sigma" / "current"])
    assert run("--sigma", "--url", f"{base}/v2.zip", "--dest", str(dest)) == 0
    out = capsys.readouterr().out
    assert "+1 added, -1 removed, 1 changed" in out, out
    v2name = current_version(dest / "sigma")
    assert v2name != v1 and (dest / "sigma" / "versions" / v1).is_dir()
    # A relay watching DIR/sigma/current sees the switch (new mtimes, paths differ in content).
    assert fingerprint([dest / "sigma" / "current"]) != before

    assert run("--sigma", "--rollback", "--dest", str(dest)) == 0
    out = capsys.readouterr().out
    assert "rolled back" in out and "-1 added, -1 removed" not in out
    assert "+1 added, -1 removed, 1 changed" in out  # v2 -> v1: the removed rule is back
    assert current_version(dest / "sigma") == v1
    assert run("--sigma", "--rollback", "--dest", str(dest)) == 1  # nothing before v1
    assert current_version(dest / "sigma") == v1


def _refused(dest: Path, url: str, *extra: str) -> str:
    return f"{run('--sigma', '--url', url, '--dest', str(dest), *extra)}"


@pytest.fixture
def installed(web: tuple[Path, str], tmp_path: Path) -> tuple[Path, str, Path, str]:
    """A destination with one good Sigma version installed."""
    root, base = web
    dest = tmp_path / "rules"
    (root / "good.zip").write_bytes(make_zip(sigma_files()))
    assert run("--sigma", "--url", f"{base}/good.zip", "--dest", str(dest)) == 0
    cur = current_version(dest / "sigma")
    assert cur is not None
    return root, base, dest, cur


def _assert_refused(
    dest: Path, cur: str, url: str, capsys: pytest.CaptureFixture[str], why: str, *extra: str
) -> None:
    capsys.readouterr()
    assert run("--sigma", "--url", url, "--dest", str(dest), *extra) == 1
    err = capsys.readouterr().err
    assert "refused" in err and why in err, err
    assert current_version(dest / "sigma") == cur
    assert len(os.listdir(dest / "sigma" / "versions")) == 1  # no staging left behind


def test_damaged_archives_are_refused(installed, capsys: pytest.CaptureFixture[str]) -> None:
    root, base, dest, cur = installed
    good = make_zip(sigma_files())
    (root / "trunc.zip").write_bytes(good[: len(good) // 2])
    _assert_refused(dest, cur, f"{base}/trunc.zip", capsys, "damaged")
    flipped = bytearray(good)
    at = good.index(b"detection") if b"detection" in good else len(good) // 3
    flipped[at : at + 8] = b"XXXXXXXX"  # inside compressed data: bad CRC or inflate error
    (root / "crc.zip").write_bytes(bytes(flipped))
    _assert_refused(dest, cur, f"{base}/crc.zip", capsys, "")
    tgz = make_tgz(sigma_files())
    (root / "trunc.tgz").write_bytes(tgz[: len(tgz) - 40])
    _assert_refused(dest, cur, f"{base}/trunc.tgz", capsys, "damaged")
    (root / "junk.zip").write_bytes(b"this is not an archive at all")
    _assert_refused(dest, cur, f"{base}/junk.zip", capsys, "")
    _assert_refused(dest, cur, f"{base}/missing.zip", capsys, "HTTP 404")


def test_sha256_checked(installed, capsys: pytest.CaptureFixture[str]) -> None:
    root, base, dest, cur = installed
    data = make_zip({**sigma_files(), "rules/extra/x.yml": sigma_files_first()})
    (root / "p.zip").write_bytes(data)
    _assert_refused(dest, cur, f"{base}/p.zip", capsys, "does not match", "--sha256", "ab" * 32)
    good = hashlib.sha256(data).hexdigest()
    assert run("--sigma", "--url", f"{base}/p.zip", "--dest", str(dest), "--sha256", good) == 0


def sigma_files_first() -> bytes:
    return next(v for k, v in sigma_files().items() if k.endswith(".yml"))


def test_path_traversal_and_links_refused(installed, capsys: pytest.CaptureFixture[str]) -> None:
    root, base, dest, cur = installed
    files = sigma_files()
    (root / "dots.zip").write_bytes(make_zip({**files, "rules/../../evil.yml": b"x"}))
    _assert_refused(dest, cur, f"{base}/dots.zip", capsys, "leaving the package")
    (root / "abs.tgz").write_bytes(make_tgz({**files, "/etc/evil.yml": b"x"}))
    _assert_refused(dest, cur, f"{base}/abs.tgz", capsys, "absolute path")
    (root / "link.tgz").write_bytes(make_tgz(files, {"rules/evil.yml": "../../../etc/passwd"}))
    _assert_refused(dest, cur, f"{base}/link.tgz", capsys, "link leaving the package")
    assert not (dest.parent / "evil.yml").exists() and not (dest / "evil.yml").exists()
    (root / "hard.tgz").write_bytes(make_tgz(files, {}, {"rules/h.yml": "../outside.yml"}))
    _assert_refused(dest, cur, f"{base}/hard.tgz", capsys, "leaving the package")
    # A link that stays inside is skipped, the package is installed.
    (root / "inside.tgz").write_bytes(make_tgz(files, {"rules/alias.yml": "windows"}))
    assert run("--sigma", "--url", f"{base}/inside.tgz", "--dest", str(dest)) == 0
    assert not (dest / "sigma" / "current" / "rules" / "alias.yml").exists()


def test_zip_bomb_capped(installed, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root, base, dest, cur = installed
    bomb = make_zip({**sigma_files(), "rules/bomb.yml": b"\0" * (8 << 20)})
    assert len(bomb) < 200_000
    (root / "bomb.zip").write_bytes(bomb)
    _assert_refused(dest, cur, f"{base}/bomb.zip", capsys, "compressed more than")
    # The total cap (a package of many small members) and the download cap.
    (root / "good2.zip").write_bytes(make_zip({**sigma_files(), "rules/x.yml": b"#\n"}))
    with pytest.raises(UpdateError, match="unpacks to more than"):
        update(dest, "sigma", f"{base}/good2.zip", limits=Limits(total=10_000))
    with pytest.raises(UpdateError, match="larger than"):
        update(dest, "sigma", f"{base}/bomb.zip", limits=Limits(download=1000))
    tbomb = make_tgz({**sigma_files(), "rules/bomb.yml": b"\0" * (8 << 20)})
    (root / "bomb.tgz").write_bytes(tbomb)
    with pytest.raises(UpdateError, match="larger than"):
        update(dest, "sigma", f"{base}/bomb.tgz", limits=Limits(file=1 << 20))
    assert current_version(dest / "sigma") == cur


def test_package_without_loadable_rule_refused(
    installed, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base, dest, cur = installed
    (root / "bad.zip").write_bytes(make_zip({"rules/a.yml": BAD_RULE.encode(), "LICENSE": b"x"}))
    _assert_refused(dest, cur, f"{base}/bad.zip", capsys, "no rule in the package")
    (root / "empty.zip").write_bytes(make_zip({"README.md": b"nothing"}))
    _assert_refused(dest, cur, f"{base}/empty.zip", capsys, "no rule in the package")


def test_elastic_tar_gz_branch_archive_and_file_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GitHub branch archive: one top folder, tooling beside rules/; only rule folders kept."""
    files = {
        f"detection-rules-main/{p.relative_to(ELASTIC)}": p.read_bytes()
        for p in sorted(ELASTIC.rglob("*"))
        if p.is_file()
    }
    files["detection-rules-main/pyproject.toml"] = b"[project]\nname = 'x'\n"
    files["detection-rules-main/tests/data/fake_rule.toml"] = b"[rule]\nname = 'x'\n"
    archive = tmp_path / "main.tar.gz"
    archive.write_bytes(make_tgz(files))
    dest = tmp_path / "rules"
    assert (
        main(["rules", "update", "--elastic", "--url", archive.as_uri(), "--dest", str(dest)]) == 0
    )
    out = capsys.readouterr().out
    assert "elastic: current -> versions/" in out
    cur = dest / "elastic" / "current"
    assert (cur / "rules").is_dir() and (cur / "rules_building_block").is_dir()
    assert not (cur / "pyproject.toml").exists() and not (cur / "tests").exists()
    assert (cur / "LICENSE.txt").exists()


def test_keep_prunes_old_versions(web: tuple[Path, str], tmp_path: Path) -> None:
    root, base = web
    dest = tmp_path / "rules"
    files = sigma_files()
    for i in range(4):
        v = {**files, "rules/extra/x.yml": sigma_files_first() + f"\n# {i}\n".encode()}
        (root / f"v{i}.zip").write_bytes(make_zip(v))
        assert run("--sigma", "--url", f"{base}/v{i}.zip", "--dest", str(dest), "--keep", "2") == 0
    kept = sorted(os.listdir(dest / "sigma" / "versions"))
    assert len(kept) == 2 and current_version(dest / "sigma") == kept[-1]


def test_url_needs_one_source(tmp_path: Path) -> None:
    assert run("--url", "http://127.0.0.1:9/x.zip", "--dest", str(tmp_path)) == 2
