"""Object storage for the tests and the benches (bench/s3_read.py): moto's S3 server on 127.0.0.1,
uploads, and a proxy that cuts connections. The server runs as its own process: pyarrow's S3
client blocks while holding the GIL in places, which deadlocks against a server thread in the same
process.

Test-only: the server is `moto[server]`'s `moto_server` next to this Python, and `deny_reads` needs
boto3 (both installed by `make`, from requirements-test.txt, not by `pip install .`). Importing this
module needs neither: boto3 is imported where it is used, moto runs as a process.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def s3() -> pafs.S3FileSystem:
    """The tests' own client (AWS_ENDPOINT_URL points at the server), allowed to make buckets."""
    return pafs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True, allow_bucket_deletion=True
    )


def make_bucket(name: str) -> None:
    s3().create_dir(name)


def upload(local: Path, dest: str) -> str:
    """Copy a local file or folder to `dest` ('bucket/prefix'); returns its s3:// URI."""
    pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3())
    return f"s3://{dest}"


def listing(prefix: str) -> list:
    """Every object under 'bucket/prefix', relative to it."""
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(i.path[len(prefix) + 1 :] for i in s3().get_file_info(sel) if i.type == pafs.FileType.File)


def deny_reads(bucket: str) -> None:
    """A bucket policy that denies reading objects (listing still works): moto answers 403, as S3 does."""
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/*"}
        ],
    }
    boto3.client("s3").put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


class CuttingProxy:
    """A TCP proxy in front of the server that resets a connection after `after` bytes of its
    response have passed, `cuts` times in all (after letting `spare` such responses through):
    dropped connections in the middle of a transfer."""

    def __init__(self, target_port: int, cuts: int, after: int = 48 << 10, spare: int = 0):
        self.target, self.left, self.after, self.spare = target_port, cuts, after, spare
        self.cut = 0
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _take_cut(self) -> bool:
        with self.lock:
            if self.spare > 0:
                self.spare -= 1
                return False
            if self.left <= 0:
                return False
            self.left -= 1
            self.cut += 1
            return True

    def _pipe(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if response and sent < self.after <= sent + len(data) and self._take_cut():
                    dst.sendall(data[: self.after - sent])
                    for s in (src, dst):  # a reset, not a clean close: the transfer is broken
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.shutdown(socket.SHUT_RD)  # wakes the other direction's thread at once
                        s.close()
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def endpoint_query(port: int) -> str:
    """The URI query that sends one location's requests to 127.0.0.1:port instead."""
    return f"?endpoint_override=127.0.0.1:{port}&scheme=http"
