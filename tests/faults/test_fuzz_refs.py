"""Fuzzing checkpoint references: typed errors only, nothing contacted or written unasked.

10,000 references (seeded ``random.Random``, never the global generator): random strings, and
mutations of every backend's documented forms and UI URLs.  Each either parses into a Ref whose
``str()`` parses back to the same Ref, or raises a CkptTrackError.  A sample of those that parse
is restored against settings that point every backend at a closed loopback port or a temporary
directory, recording every socket connect and name lookup: only typed errors, no host that the
reference or the settings do not name, no file in the working directory.

``CKPT_TRACK_FAULTS_LONG=1`` restores a bigger sample (300 instead of 40).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckpt_track as ct
from ckpt_track import network
from ckpt_track.errors import CkptTrackError
from ckpt_track.refs import Ref, parse_ref

COUNT = 10_000
SEED = 20261201
RESTORES = 300 if os.environ.get("CKPT_TRACK_FAULTS_LONG") == "1" else 40

HEX = "0123456789abcdef" * 2
RUN = "3f" * 16
MODEL = "m-" + "ab" * 16
KEY = "c0ffee" + "0" * 26

SEEDS = [
    # canonical forms (refs.py) and each backend's own forms (ref_forms(), tests/test_refs.py)
    "local://resnet/3k2j1x", "local://resnet/3k2j1x@best", "local://resnet/3k2j1x@step=500",
    "local://resnet/3k2j1x:v3", "local://resnet/3k2j1x@latest?root=/data/ckpts", "local://p/r@step-500",
    f"mlflow://{RUN}", f"mlflow://{RUN}@latest", f"mlflow://{RUN}@step=3000", f"mlflow://{RUN}:v2",
    f"mlflow://models/{MODEL}", "mlflow://registered/resnet:v3", f"runs:/{RUN}", f"runs:/{RUN}/best",
    f"runs:/{RUN}/v2", f"models:/{MODEL}", "models:/resnet/3", "models:/resnet/latest", "models:/resnet@champion",
    f"http://127.0.0.1:5000/#/experiments/1/runs/{RUN}", f"http://localhost:5000/#/experiments/2/models/{MODEL}",
    "https://mlflow.example.com/#/models/resnet/versions/4", f"http://[::1]:5000/#/experiments/1/runs/{RUN}",
    "wandb://acme/resnet/3k2j1x", "wandb://acme/resnet/3k2j1x:v7", "wandb://resnet/3k2j1x@best",
    "wandb://acme/resnet/3k2j1x?base_url=https://wandb.example.com",
    "acme/resnet/ckpt-3k2j1x:v0", "resnet/ckpt-3k2j1x:best", "wandb-artifact://acme/resnet/ckpt-3k2j1x:v1",
    "wandb-artifact://https://wandb.example.com/acme/resnet/ckpt-3k2j1x:latest",
    "https://wandb.ai/acme/resnet/runs/3k2j1x", "https://forge.coreweave.com/wandb/acme/resnet/runs/3k2j1x",
    "https://wandb.ai/acme/resnet/artifacts/model/ckpt-3k2j1x/v3", "https://wandb.example.com/acme/resnet/runs/3k2j1x",
    f"clearml://{HEX}", f"clearml://{HEX}@best", f"clearml://offline-{HEX}:v2", f"clearml://models/{HEX}",
    "clearml://proj/run-1@latest", HEX, f"offline-{HEX}@step=20",
    f"https://app.clear.ml/projects/*/experiments/{HEX}/output/log",
    f"https://app.clear.ml/projects/{HEX}/tasks/{HEX}/", f"https://clearml.example.com/projects/x/models/{HEX}/general",
    f"comet://acme/resnet/{KEY}", f"comet://acme/resnet/{KEY}@best", f"comet://resnet/{KEY}:v2",
    "comet://registry/acme/resnet-ckpt@1.0.0", f"experiment://{KEY}/ckpt-v3-step300",
    "experiment://acme/resnet/my-exp/ckpt-v1-step10", "registry://acme/resnet-ckpt:2.0.0", "registry://acme/resnet-ckpt",
    f"https://www.comet.com/acme/resnet/{KEY}", f"https://comet.example.com/acme/resnet/{KEY}/panels?x=1",
    # hosted trackers' pages (issue 15), and a self-hosted URL two backends claim
    f"https://acme.cloud.databricks.com/ml/experiments/12/runs/{RUN}", (f"https://a.azuredatabricks.net/?o=1#mlflow/"
                                                                        f"experiments/12/runs/{RUN}"), "https://x.gcp.databricks.com/explore/data/models/main/ml/resnet/version/3",
    f"https://acme.cloud.databricks.com/ml/experiments/12/models/{MODEL}", "https://acme.wandb.io/acme/resnet/runs/3k2j1x",
    "https://www.comet.com/acme/model-registry/resnet-ckpt/2.0.0", f"https://ml.example.com/ml/experiments/1/runs/{RUN}",
    # typos that get a did-you-mean
    "lcoal://p/r", "local://p/r@bset", f"mlfow://{RUN}@lateset", "local://p/r@setp=5", "local://p/r:V3",
]
ODD = ["[", "]", "[::1", "::1]", ":", ":99999", ":-1", ":0", ":65536", "@", "@@", "?", "?root=", "&", "#", "#/",
       "%", "%zz", "%00", "%ff", "%ED%A0%80", "/", "//", "..", "\\", " ", "\t", "\n", "\x00", "\x7f", "\ud800",
       "\udfff", "é", "\u202e", "\ufeff", "😀", "ｈｔｔｐ", "ß", "v", ":v", ":v0", ":v-1", "@step=", "@step=-1",
       "@step=1e3", "http://", "https://", "://", "runs:/", "models:/", "xn--", "[::ffff:127.0.0.1]", "[fe80::1%25lo]"]
ALPHABET = "abcdefXYZ0189-_./:@?=&%#[]~+ \t\x00é\ud800😀"


def _mutate(rng: random.Random, text: str) -> str:
    """One to three random edits of ``text``."""
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(text))
        op = rng.randrange(10)
        if op == 0:  # insert a character
            text = text[:i] + rng.choice(ALPHABET) + text[i:]
        elif op == 1 and text:  # delete one
            text = text[:i] + text[i + 1:]
        elif op == 2 and text:  # replace one
            text = text[:i] + rng.choice(ALPHABET) + text[i + 1:]
        elif op == 3:  # truncate
            text = text[:i]
        elif op == 4:  # duplicate a slice
            j = rng.randint(i, len(text))
            text = text[:j] + text[i:j] + text[j:]
        elif op == 5 and text:  # percent-encode one character
            i = min(i, len(text) - 1)
            enc = "".join(f"%{b:02X}" for b in text[i].encode("utf-8", "surrogatepass"))
            text = text[:i] + enc + text[i + 1:]
        elif op == 6:  # an odd token: brackets, ports, surrogates, NUL, unicode
            text = text[:i] + rng.choice(ODD) + text[i:]
        elif op == 7:  # a very long part
            text = text[:i] + rng.choice("a9/-%") * rng.choice((255, 256, 1000, 5000)) + text[i:]
        elif op == 8:  # a port or an IPv6 host
            host = rng.choice(["127.0.0.1:99999", "[::1", "[::1]:-5", "h:0x50", "[v1.x]", "[::1]:65535", "h:"])
            text = text.replace("127.0.0.1:5000", host).replace("wandb.ai", host).replace("www.comet.com", host)
        else:  # swap the scheme
            scheme = rng.choice(["local", "mlflow", "wandb", "clearml", "comet", "http", "https", "runs", "s3", ""])
            text = scheme + text[text.find(":"):] if ":" in text else f"{scheme}://{text}"
    return text


def _corpus() -> Iterator[str]:
    rng = random.Random(SEED)
    for i in range(COUNT):
        kind = i % 10
        if kind == 0:
            yield "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        elif kind == 1:
            yield rng.choice(SEEDS)
        else:
            yield _mutate(rng, rng.choice(SEEDS))


def _parse(text: str) -> Ref | None:
    try:
        return parse_ref(text)
    except CkptTrackError as exc:
        assert str(exc).strip(), f"{text!r}: empty message from {type(exc).__name__}"
        assert "\n" not in str(exc), f"{text!r}: a message of several lines: {exc}"
        return None


def test_fuzz_parse_ref_10000() -> None:
    state = random.getstate()
    slowest, parsed, failures = 0.0, 0, []
    for text in _corpus():
        start = time.perf_counter()
        try:
            ref = _parse(text)
            if ref is not None:
                parsed += 1
                again = parse_ref(str(ref))  # str() works and round-trips
                assert again == ref, f"{text!r} -> {str(ref)!r} -> {again!r}"
        except Exception as exc:  # noqa: BLE001 - anything but a CkptTrackError is a bug
            failures.append(f"{text[:120]!r}: {type(exc).__name__}: {exc}"[:300])
        slowest = max(slowest, time.perf_counter() - start)
    assert not failures, f"{len(failures)} references raised an untyped error:\n" + "\n".join(failures[:20])
    assert slowest < 10.0, f"one reference took {slowest:.2f} s to parse"
    assert parsed > COUNT // 10, f"only {parsed} of {COUNT} parsed: the mutations are too destructive"
    assert random.getstate() == state, "parsing consumed the global random generator"


@pytest.mark.parametrize("text", [
    "http://[::1", "https://[::1/acme/resnet/runs/3k2j1x", "https://h:99999/acme/resnet/runs/3k2j1x",
    "wandb-artifact://https://[::1/acme/resnet/ckpt-3k2j1x:v1", "https://www.comet.com:99999/acme/resnet/" + KEY,
    "local://p/r\ud800", "local://p/r\x00", "local://p/r?root=a%00b",
    "local://" + "a" * 300 + "/r", "local://p/r@" + "a" * 5000, "mlflow://" + RUN + "@be\nst",
])
def test_known_malformed_references_are_invalid_ref(text: str) -> None:
    with pytest.raises(CkptTrackError) as info:
        ref = parse_ref(text)
        str(ref)
    assert type(info.value).__name__ == "InvalidRef" or text.startswith("local://p/r?root="), info.value
    assert "\n" not in str(info.value)  # one line; `ckpt-track refs` lists the forms


def test_an_overlong_local_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ct.ConfigError, match="root"):
        ct.restore("local://p/r?root=/" + "a" * 300, settings=ct.load_settings())


# -- restores ------------------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}


class Recorder:
    """Records every connect and name lookup; refuses anything not on the loopback interface."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    def _check(self, host: object) -> None:
        h = host.decode() if isinstance(host, bytes) else host
        h = str(h).strip("[]") if h is not None else None
        self.hosts.append(str(h))
        if h not in LOOPBACK:
            raise ConnectionRefusedError(f"test: contact to {h!r} refused")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo

        def connect(sock: socket.socket, address: object) -> object:
            if isinstance(address, tuple):
                self._check(address[0])
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: object) -> object:
            if isinstance(address, tuple):
                self._check(address[0])
            return real_connect_ex(sock, address)

        def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
            self._check(host)
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    network._reset_for_tests()
    yield here
    network._reset_for_tests()


def _restore_settings(tmp_path: Path, port: int) -> ct.Settings:
    return ct.load_settings({
        "timeout": 1, "retries": 0,
        "local": {"root": str(tmp_path / "local")},
        "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"},
        "wandb": {"mode": "offline", "dir": str(tmp_path / "wandb")},
        "comet": {"online": False, "offline_directory": str(tmp_path / "comet")},
        "clearml": {"offline_dir": str(tmp_path / "clearml")},
    })


def test_fuzz_restore_contacts_nothing_unnamed(cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    for var in ("MLFLOW_TRACKING_URI", "WANDB_BASE_URL", "COMET_URL_OVERRIDE", "CLEARML_OFFLINE_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "test")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "test")
    # the SDK reads its config file once per process: the one every ClearML test uses (no
    # synchronous repository detection, which would stall a later Task.close())
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(Path(__file__).parents[2] / "backends" / "clearml.conf"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    settings = _restore_settings(tmp_path, port)
    rng = random.Random(SEED + 1)
    refs = [ref for text in _corpus() if (ref := _parse(text)) is not None]
    sample = rng.sample(refs, min(RESTORES, len(refs)))
    # every backend, whatever the sample drew
    sample += [parse_ref(t) for t in (f"mlflow://{RUN}@latest", "wandb://acme/resnet/3k2j1x", f"clearml://{HEX}",
                                      f"comet://acme/resnet/{KEY}", "local://p/r")]
    recorder = Recorder()
    recorder.install(monkeypatch)
    failures = []
    for ref in sample:
        named = str(ref).lower()
        before = len(recorder.hosts)
        try:
            ct.restore(ref, settings=settings)
            failures.append(f"{ref}: restored something from an empty store")
        except CkptTrackError:
            pass
        except Exception as exc:  # noqa: BLE001 - anything but a CkptTrackError is a bug
            failures.append(f"{ref}: {type(exc).__name__}: {exc}"[:300])
        stray = [h for h in recorder.hosts[before:] if h not in {str(x) for x in LOOPBACK} and h.lower() not in named]
        if stray:
            failures.append(f"{ref}: contacted {sorted(set(stray))}, named neither in the reference nor the settings")
        if list(cwd.iterdir()):
            failures.append(f"{ref}: created {sorted(p.name for p in cwd.iterdir())} in the working directory")
            for p in cwd.iterdir():
                p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    assert not failures, "\n".join(failures[:20])
