"""Download and unpack the MovieLens ratings from GroupLens (urllib only).

    ratings = download("ml-1m", "data/")      # -> data/ml-1m/ratings.dat
    dataset = diffrec_ext.data.load_dataset(ratings)

The archive streams to a temporary file beside its destination, is checked against its MD5, renamed
into place atomically, and unpacked through a temporary folder after every member path is checked to
stay inside the destination. A failed download or check leaves nothing behind.

Checksums: the official archives' MD5s are pinned below (GroupLens publishes each one beside the
archive, at <archive>.md5). For another `base_url` (a mirror, a test server), the `<archive>.md5`
published there is used, or pass `md5=` yourself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DownloadError

__all__ = ["GROUPLENS_URL", "MOVIELENS", "DownloadError", "download"]

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class MovieLensArchive:
    archive: str  # file name under the base URL
    ratings: str  # path of the ratings file inside the archive
    md5: str  # of the official archive


MOVIELENS = {
    "ml-100k": MovieLensArchive("ml-100k.zip", "ml-100k/u.data", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": MovieLensArchive("ml-1m.zip", "ml-1m/ratings.dat", "c4d9eecfca2ab87c1945afe126590906"),
    "ml-10m": MovieLensArchive("ml-10m.zip", "ml-10M100K/ratings.dat", "ce571fd55effeba0271552578f2648bd"),
    "ml-20m": MovieLensArchive("ml-20m.zip", "ml-20m/ratings.csv", "cd245b17a1ae2cc31bb14903e1204af3"),
    "ml-25m": MovieLensArchive("ml-25m.zip", "ml-25m/ratings.csv", "6b51fb2759a8657d3bfcbfc42b592ada"),
}


def _open_url(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"could not fetch {url}: {getattr(error, 'reason', error)}") from error


def _published_md5(url: str, timeout: float) -> str:
    """The MD5 in `<url>.md5`, in either the BSD (`MD5 (f) = hex`) or the GNU (`hex  f`) layout."""
    with _open_url(url + ".md5", timeout) as response:
        text = response.read(4096).decode("ascii", errors="replace")
    digests = set(re.findall(r"\b[0-9a-fA-F]{32}\b", text))
    if len(digests) != 1:
        raise DownloadError(f"{url}.md5 does not hold exactly one MD5 digest: {text[:200]!r}")
    return digests.pop().lower()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(url: str, destination: Path, expected_md5: str, required: str, timeout: float) -> None:
    """Streams url to a temporary file in destination's folder, checks its MD5 and its members, then
    renames it to destination; on any failure the temporary file is removed."""
    handle = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=f".{destination.name}.",
                                         suffix=".part", delete=False)
    partial = Path(handle.name)
    try:
        digest = hashlib.md5()
        with handle, _open_url(url, timeout) as response:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                handle.write(chunk)
        if digest.hexdigest() != expected_md5:
            raise DownloadError(f"{url}: MD5 {digest.hexdigest()} does not match the expected {expected_md5}; "
                                "the download was corrupted or the file changed, and it was deleted")
        _checked_members(partial, required, source=url)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def _checked_members(archive_path: Path, required: str, source) -> list[zipfile.ZipInfo]:
    """The archive's members, after checking that it is a zip holding `required` and rejecting absolute
    paths, '..' components and symbolic links, which could write outside the destination."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{source} is not a valid zip archive ({error})") from error
    for member in members:
        parts = PurePosixPath(member.filename.replace("\\", "/")).parts
        is_link = stat.S_ISLNK(member.external_attr >> 16)
        if not parts or parts[0] == "/" or ":" in parts[0] or ".." in parts or is_link:
            raise DownloadError(f"{source}: unsafe archive member {member.filename!r} (absolute path, "
                                "'..' or link, which could escape the destination); nothing was extracted")
    if required not in {member.filename for member in members}:
        raise DownloadError(f"{source} has no {required}")
    return members


def _extract(archive_path: Path, dest_dir: Path, required: str) -> None:
    """Unpacks into a temporary folder inside dest_dir, then moves each file into place (merging with
    folders that exist, whose other files stay), the ratings file last: its presence marks a
    complete extraction."""
    members = _checked_members(archive_path, required, source=archive_path)
    staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(staging, members)
        files = dict.fromkeys([m.filename for m in members if not m.is_dir() and m.filename != required] + [required])
        for name in files:
            target = dest_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(name: str, dest_dir, base_url: str | None = None, *, md5: str | None = None,
             force: bool = False, timeout: float = 60.0) -> Path:
    """Downloads MovieLens `name` (one of MOVIELENS: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m) into
    dest_dir and returns the path of its ratings file. An existing ratings file is reused unless
    force; an existing archive with the right MD5 is not downloaded again. The archive is kept.

    base_url: where the archives are (default GROUPLENS_URL). md5: the archive's expected MD5
    (default: pinned for GroupLens, else the `<archive>.md5` published at base_url).
    """
    if name not in MOVIELENS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; choose one of {sorted(MOVIELENS)}")
    spec = MOVIELENS[name]
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    ratings = dest_dir / spec.ratings
    if ratings.is_file() and not force:
        return ratings

    url = (base_url or GROUPLENS_URL).rstrip("/") + "/" + spec.archive
    if md5 is None:
        md5 = spec.md5 if base_url is None else _published_md5(url, timeout)
    md5 = md5.lower()
    archive = dest_dir / spec.archive
    if force or not archive.is_file() or _file_md5(archive) != md5:
        log.info("downloading %s to %s", url, archive)
        _fetch_verified(url, archive, md5, spec.ratings, timeout)
    _extract(archive, dest_dir, spec.ratings)
    return ratings
