"""download() against a loopback HTTP server started here: no real network."""

import hashlib
import http.server
import threading
import zipfile
from functools import partial

import pytest

from diffrec_ext.data import read_interactions
from diffrec_ext.download import MOVIELENS, DownloadError, download

RATINGS = b"1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/www on a free loopback port; yields (www folder, base URL, request log)."""
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _publish(www, name="ml-1m.zip", members=None, md5_text=None):
    members = members if members is not None else {"ml-1m/ratings.dat": RATINGS, "ml-1m/README": b"readme\n"}
    archive = www / name
    with zipfile.ZipFile(archive, "w") as handle:
        for member, content in members.items():
            handle.writestr(member, content)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    # GroupLens publishes the BSD layout: "MD5 (ml-1m.zip) = <hex>"
    (www / f"{name}.md5").write_text(md5_text or f"MD5 ({name}) = {digest}\n")
    return digest


def _leftovers(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_download_verifies_extracts_and_reads(server, tmp_path):
    www, base_url, requests = server
    digest = _publish(www)
    dest = tmp_path / "data"
    ratings = download("ml-1m", dest, base_url=base_url)
    assert ratings == dest / "ml-1m" / "ratings.dat"
    assert ratings.read_bytes() == RATINGS
    assert (dest / "ml-1m" / "README").read_bytes() == b"readme\n"
    assert hashlib.md5((dest / "ml-1m.zip").read_bytes()).hexdigest() == digest
    assert not [p for p in _leftovers(dest) if p.startswith(".")]  # no partial files or staging folders

    table = read_interactions(ratings)
    assert table["user"].tolist() == [1, 1, 2]
    assert table["item"].tolist() == [1193, 661, 1357]
    assert table["timestamp"].tolist() == [978300760, 978302109, 978298709]

    # A second call finds the ratings file and asks the server nothing.
    count = len(requests)
    assert download("ml-1m", dest, base_url=base_url) == ratings
    assert len(requests) == count


def test_corrupted_archive_is_rejected_and_nothing_is_left(server, tmp_path):
    www, base_url, _ = server
    _publish(www, md5_text="MD5 (ml-1m.zip) = 0123456789abcdef0123456789abcdef\n")
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="MD5 .* does not match the expected 0123456789abcdef"):
        download("ml-1m", dest, base_url=base_url)
    assert _leftovers(dest) == []


def test_explicit_md5_overrides_the_published_one(server, tmp_path):
    www, base_url, _ = server
    digest = _publish(www)
    with pytest.raises(DownloadError, match="does not match"):
        download("ml-1m", tmp_path / "bad", base_url=base_url, md5="f" * 32)
    assert _leftovers(tmp_path / "bad") == []
    assert download("ml-1m", tmp_path / "good", base_url=base_url, md5=digest.upper()).is_file()


def test_gnu_md5_layout_is_understood(server, tmp_path):
    www, base_url, _ = server
    digest = _publish(www, name="ml-100k.zip", members={"ml-100k/u.data": b"196\t242\t3\t881250949\n"})
    (www / "ml-100k.zip.md5").write_text(f"{digest}  ml-100k.zip\n")
    ratings = download("ml-100k", tmp_path / "data", base_url=base_url)
    assert read_interactions(ratings)["item"].tolist() == [242]


def test_missing_checksum_file_is_an_error(server, tmp_path):
    www, base_url, _ = server
    _publish(www)
    (www / "ml-1m.zip.md5").unlink()
    with pytest.raises(DownloadError, match=r"ml-1m\.zip\.md5: HTTP 404"):
        download("ml-1m", tmp_path / "data", base_url=base_url)
    assert _leftovers(tmp_path / "data") == []


@pytest.mark.parametrize("member", ["../evil.txt", "ml-1m/../../evil.txt", "/tmp/evil.txt"])
def test_paths_escaping_the_destination_are_rejected(server, tmp_path, member):
    www, base_url, _ = server
    _publish(www, members={"ml-1m/ratings.dat": RATINGS, member: b"gotcha\n"})
    dest = tmp_path / "deep" / "data"
    with pytest.raises(DownloadError, match="unsafe archive member"):
        download("ml-1m", dest, base_url=base_url)
    assert _leftovers(dest) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_symlink_members_are_rejected(server, tmp_path):
    www, base_url, _ = server
    archive = www / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("ml-1m/ratings.dat", RATINGS)
        link = zipfile.ZipInfo("ml-1m/link")
        link.external_attr = 0o120777 << 16  # a symbolic link to /etc
        handle.writestr(link, "/etc")
    (www / "ml-1m.zip.md5").write_text(hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DownloadError, match="unsafe archive member 'ml-1m/link'"):
        download("ml-1m", tmp_path / "data", base_url=base_url)
    assert _leftovers(tmp_path / "data") == []


def test_archive_without_the_ratings_file_is_rejected(server, tmp_path):
    www, base_url, _ = server
    _publish(www, members={"ml-1m/movies.dat": b"1::Toy Story (1995)::Animation\n"})
    with pytest.raises(DownloadError, match="has no ml-1m/ratings.dat"):
        download("ml-1m", tmp_path / "data", base_url=base_url)
    assert _leftovers(tmp_path / "data") == []


def test_existing_files_beside_the_archive_folder_survive(server, tmp_path):
    www, base_url, _ = server
    _publish(www)
    mine = tmp_path / "data" / "ml-1m" / "my-notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    download("ml-1m", tmp_path / "data", base_url=base_url)
    assert mine.read_text() == "keep me"


def test_unknown_name_and_the_catalog():
    with pytest.raises(ValueError, match="unknown MovieLens dataset 'ml-2m'"):
        download("ml-2m", "unused")
    assert set(MOVIELENS) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m"}
    assert all(spec.md5 and len(spec.md5) == 32 for spec in MOVIELENS.values())


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="could not fetch http://127.0.0.1:9/ml-1m.zip.md5"):
        download("ml-1m", tmp_path, base_url="http://127.0.0.1:9", timeout=5)
