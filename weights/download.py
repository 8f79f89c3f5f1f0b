"""Download the official SDXL base checkpoint into weights/, resumably, and verify it.

    python weights/download.py

fetches `sd_xl_base_1.0.safetensors` (6.9 GB) from Stability AI's Hugging Face repository into
`weights/` with a progress bar. The bytes go to `<out>.part` first; an interrupted download
resumes from where it stopped (an HTTP Range request) when the command is run again. The file
is moved into place, atomically, only after its size and SHA-256 match the published ones, so
a file named `sd_xl_base_1.0.safetensors` in `weights/` is always the complete, official one.

Only the standard library and tqdm: this runs before anything else is set up. `HF_ENDPOINT`
(the Hugging Face mirror variable) changes the default host, as it does for huggingface_hub.

Read next: weights/README.md (which files live here), then sample.py.
"""

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

# The official file, as published on its Hugging Face page
# (huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/sd_xl_base_1.0.safetensors:
# the Git LFS pointer's "oid sha256" and "size"; the same numbers appear in the X-Linked-ETag and
# X-Linked-Size headers of the download and in other projects' download manifests).
REPO_FILE = "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"
SHA256 = "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
SIZE = 6_938_078_334  # bytes

CHUNK = 1 << 20  # bytes per read and per hash update
TIMEOUT = 60  # seconds without data before a connection counts as lost


class DownloadError(Exception):
    """A failed download, with one sentence saying what happened and what to do."""


def default_url() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{REPO_FILE}"


def _hash_file(path: str, sha) -> None:
    """Feed an existing partial download to the running hash, so that resuming hashes each byte once."""
    with open(path, "rb") as f, tqdm(
        total=os.path.getsize(path), desc="hashing the partial download", unit="B", unit_scale=True, unit_divisor=1024
    ) as bar:
        while block := f.read(CHUNK):
            sha.update(block)
            bar.update(len(block))


def _open(url: str, start: int):
    """GET `url` from byte `start` on (a Range request when resuming); return (response, offset)
    where offset is the byte the response body starts at: `start`, or 0 if the server ignored the
    Range header and sends the whole file."""
    request = urllib.request.Request(url, headers={"User-Agent": "cocoins-download/1.0"})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"the server answered HTTP {e.code} ({e.reason}) for {url}; check the address (--url)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}); check the network connection or the address (--url)") from None
    if response.status == 206:
        # Content-Range: bytes <first>-<last>/<total>
        first = int(response.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
        if first != start:
            raise DownloadError(f"the server resumed at byte {first} instead of {start}; delete the .part file and run again")
        return response, start
    return response, 0


def _total_size(response, offset: int) -> int | None:
    """The full file size the server reports, or None if it does not say."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def download(url: str, out: str, sha256: str, size: int) -> None:
    """Download `url` to `out` via `out + ".part"`, resuming, then verify size and SHA-256."""
    part = out + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > size:  # not a prefix of the wanted file: start over
        os.remove(part)
        have = 0

    sha = hashlib.sha256()
    if have < size:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
        if free < size - have:
            raise DownloadError(
                f"not enough disk space for {out}: {(size - have) / 1e9:.1f} GB more are needed and {free / 1e9:.1f} GB are free"
            )
        response, offset = _open(url, have)
        with response:
            total = _total_size(response, offset)
            if total is not None and total != size:
                raise DownloadError(
                    f"the server's file has {total} bytes but {size} were expected; check --url, or pass --size and --sha256 for another file"
                )
            if offset > 0:
                _hash_file(part, sha)
            # 'ab' continues a resumed file; 'wb' restarts one the server would not resume.
            with open(part, "ab" if offset > 0 else "wb") as f, tqdm(
                total=size, initial=offset, desc=os.path.basename(out), unit="B", unit_scale=True, unit_divisor=1024
            ) as bar:
                try:
                    while block := response.read(CHUNK):
                        f.write(block)
                        sha.update(block)
                        bar.update(len(block))
                except (http.client.HTTPException, OSError) as e:
                    raise DownloadError(
                        f"the download was interrupted ({type(e).__name__}: {e}); run the same command again to resume it"
                    ) from None
                f.flush()
                os.fsync(f.fileno())
    else:  # a complete .part left by an earlier run that stopped before verifying
        _hash_file(part, sha)

    got = os.path.getsize(part)
    if got != size:
        raise DownloadError(f"the download stopped at {got} of {size} bytes; run the same command again to resume it")
    digest = sha.hexdigest()
    if digest != sha256.lower():
        os.remove(part)
        raise DownloadError(
            f"the downloaded file's SHA-256 is {digest}, not the expected {sha256.lower()}, so it was deleted; run the command again to download it afresh"
        )
    # Atomic on one filesystem: `out` is never a half-written or unverified file.
    os.replace(part, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Download and verify the official SDXL base checkpoint.")
    parser.add_argument("--url", default=default_url(), help="where to download from (default: the official file on Hugging Face, or $HF_ENDPOINT)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd_xl_base_1.0.safetensors"),
        help="destination file, or a folder to put it in (default: weights/sd_xl_base_1.0.safetensors)",
    )
    parser.add_argument("--sha256", default=SHA256, help="expected SHA-256 of the file (default: the official one)")
    parser.add_argument("--size", type=int, default=SIZE, help="expected size in bytes (default: the official one)")
    args = parser.parse_args(argv)

    out = args.out
    if os.path.isdir(out):
        out = os.path.join(out, os.path.basename(urllib.parse.urlsplit(args.url).path))
    if os.path.exists(out):
        if os.path.getsize(out) == args.size:
            print(f"{out} is already there.")
            return
        sys.exit(f"error: {out} exists but has {os.path.getsize(out)} bytes instead of {args.size}; delete it and run again.")
    try:
        download(args.url, out, args.sha256, args.size)
    except DownloadError as e:
        sys.exit(f"error: {e}.")
    except KeyboardInterrupt:
        sys.exit(f"\nstopped; run the same command again to resume from {out}.part.")
    print(f"saved {out} ({args.size} bytes, SHA-256 verified).")


if __name__ == "__main__":
    main()
