"""weights/download.py against a small file served on loopback, run as a user runs it."""

import hashlib
import http.server
import importlib.util
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "weights", "download.py")
DATA = random.Random(0).randbytes(2_500_000)  # spans several 1 MiB reads
SHA = hashlib.sha256(DATA).hexdigest()
HF_PATH = "/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA at /file.bin (and at the Hugging Face path), honouring `Range: bytes=N-`;
    /redirect/<path> answers 302 to /<path>. Every request is logged as (path, Range, bytes sent)."""

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/" + self.path.removeprefix("/redirect/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            srv.log.append((self.path, rng, 0))
            return
        if self.path not in ("/file.bin", HF_PATH):
            self.send_error(404)
            srv.log.append((self.path, rng, 0))
            return
        start = 0
        if rng is not None and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # `cut_after` imitates a dropped connection: fewer bytes than Content-Length promised.
        sent = body if srv.cut_after is None else body[: srv.cut_after]
        try:
            self.wfile.write(sent)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (it may, on purpose)
            pass
        srv.log.append((self.path, rng, len(sent)))
        if srv.cut_after is not None and srv.reset:
            # an abortive close: the client gets a TCP reset instead of an orderly end of data
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.log, srv.ignore_range, srv.cut_after, srv.reset = [], False, None, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def run(*args, env=None):
    """`python weights/download.py ARGS`, as a user runs it; returns the finished process."""
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def fetch(url, out, sha=SHA, size=len(DATA)):
    return run("--url", url, "--out", str(out), "--sha256", sha, "--size", str(size))


def error_line(proc) -> str:
    """The last line on stderr (progress bars come before it), checked to be one sentence."""
    assert proc.returncode != 0
    line = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith(".") and line.count(". ") == 0, line
    return line


def test_downloads_verifies_and_moves_the_file_into_place(server, tmp_path):
    out = tmp_path / "model.safetensors"
    proc = fetch(server.url + "/file.bin", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == DATA and not (tmp_path / "model.safetensors.part").exists()
    assert server.log == [("/file.bin", None, len(DATA))]
    assert "SHA-256 verified" in proc.stdout


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    out = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(DATA[:1_000_001])
    proc = fetch(server.url + "/file.bin", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == DATA
    # only the remainder crossed the wire
    assert server.log == [("/file.bin", "bytes=1000001-", len(DATA) - 1_000_001)]


def test_an_interrupted_download_keeps_its_part_file_and_the_next_run_finishes_it(server, tmp_path):
    out = tmp_path / "model.safetensors"
    server.cut_after = 700_000
    line = error_line(fetch(server.url + "/file.bin", out))
    assert "stopped at 700000 of 2500000 bytes" in line and "run the same command again to resume" in line
    assert (tmp_path / "model.safetensors.part").read_bytes() == DATA[:700_000] and not out.exists()

    server.cut_after = None
    assert fetch(server.url + "/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA
    assert server.log[-1] == ("/file.bin", "bytes=700000-", len(DATA) - 700_000)


def test_a_reset_connection_keeps_a_clean_prefix_that_resumes(server, tmp_path):
    out = tmp_path / "model.safetensors"
    server.cut_after, server.reset = 700_000, True
    line = error_line(fetch(server.url + "/file.bin", out))
    assert "run the same command again to resume" in line
    kept = (tmp_path / "model.safetensors.part").read_bytes()
    assert DATA.startswith(kept) and len(kept) <= 700_000

    server.cut_after = None
    assert fetch(server.url + "/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA


def test_resuming_through_a_redirect_keeps_the_range_header(server, tmp_path):
    # Hugging Face answers /resolve/ with a redirect to its CDN.
    out = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(DATA[:5])
    assert fetch(server.url + "/redirect/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA
    assert server.log == [("/redirect/file.bin", "bytes=5-", 0), ("/file.bin", "bytes=5-", len(DATA) - 5)]


def test_a_server_that_ignores_range_makes_the_download_restart_cleanly(server, tmp_path):
    out = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    server.ignore_range = True
    assert fetch(server.url + "/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA


def test_a_wrong_sha256_deletes_the_part_file_and_says_so(server, tmp_path):
    out = tmp_path / "model.safetensors"
    line = error_line(fetch(server.url + "/file.bin", out, sha="0" * 64))
    assert f"SHA-256 is {SHA}" in line and "deleted" in line
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_size_is_reported_before_downloading(server, tmp_path):
    out = tmp_path / "model.safetensors"
    line = error_line(fetch(server.url + "/file.bin", out, size=len(DATA) + 1))
    assert f"has {len(DATA)} bytes but {len(DATA) + 1} were expected" in line
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_is_down_gives_one_sentence(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = error_line(fetch(f"http://127.0.0.1:{port}/file.bin", tmp_path / "m.safetensors"))
    assert f"cannot reach 127.0.0.1:{port}" in line and "check the network connection" in line
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_on_the_server_gives_one_sentence(server, tmp_path):
    line = error_line(fetch(server.url + "/nothing.bin", tmp_path / "m.safetensors"))
    assert "HTTP 404" in line and "--url" in line


def test_a_complete_file_is_not_downloaded_again(server, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(DATA)
    proc = fetch(server.url + "/file.bin", out)
    assert proc.returncode == 0 and "already there" in proc.stdout and server.log == []


def test_a_complete_part_file_is_verified_without_downloading(server, tmp_path):
    out = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(DATA)  # an earlier run stopped before verifying
    assert fetch(server.url + "/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA and server.log == []


def test_a_part_file_longer_than_the_file_is_discarded(server, tmp_path):
    out = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(DATA + b"junk")
    assert fetch(server.url + "/file.bin", out).returncode == 0
    assert out.read_bytes() == DATA and server.log == [("/file.bin", None, len(DATA))]


def test_an_existing_file_of_the_wrong_size_is_reported_and_left_alone(server, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"abc")
    line = error_line(fetch(server.url + "/file.bin", out))
    assert "exists but has 3 bytes" in line and "delete it" in line
    assert out.read_bytes() == b"abc" and server.log == []


def test_hf_endpoint_changes_the_default_address_and_out_may_be_a_folder(server, tmp_path):
    proc = run("--out", str(tmp_path), "--sha256", SHA, "--size", str(len(DATA)), env={"HF_ENDPOINT": server.url})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sd_xl_base_1.0.safetensors").read_bytes() == DATA
    assert server.log == [(HF_PATH, None, len(DATA))]


def load_module():
    spec = importlib.util.spec_from_file_location("download", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_official_checkpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    dl = load_module()
    assert dl.default_url() == "https://huggingface.co" + HF_PATH
    assert (dl.SIZE, dl.SHA256) == (6_938_078_334, "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b")


def test_too_little_disk_space_is_reported_before_downloading(server, tmp_path, monkeypatch):
    dl = load_module()
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: SimpleNamespace(total=10_000, used=9_000, free=1000))
    with pytest.raises(dl.DownloadError, match="not enough disk space"):
        dl.download(server.url + "/file.bin", str(tmp_path / "m.safetensors"), SHA, len(DATA))
    assert server.log == []
