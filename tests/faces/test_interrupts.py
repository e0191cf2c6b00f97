"""Ctrl-C in the long-running commands, as a user at a terminal would press it (SIGINT to the process): a chat reply
stops and the prompt comes back with the conversation kept, a second Ctrl-C at the prompt exits 130; generate says
what it did and exits 130; an interrupted convert leaves no folder that would load as complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
CLI = [sys.executable, "-m", "mixtral_offload_plugin.cli"]
ENV = {**os.environ, "MIXTRAL_OFFLOAD_QUIET": "1", "PYTHONUNBUFFERED": "1", "MIXTRAL_OFFLOAD_PLUGINS": ""}


class Reader:
    """Collects a process's output on a thread, so the test can wait for text to appear."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(256) if hasattr(stream, "read1") else stream.read(1):
            with self._lock:
                self.text += chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk

    def wait_for(self, what: str, after: int = 0, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                i = self.text.find(what, after)
            if i >= 0:
                return i
            time.sleep(0.05)
        msg = f"{what!r} did not appear in {timeout} s; output so far:\n{self.text[-3000:]}"
        raise AssertionError(msg)


def test_ctrl_c_stops_a_chat_reply_and_keeps_the_conversation(demo_model_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "chat", "--max-new-tokens", "1000", "--temperature", "0.9", "--seed", "1",
                             "--ignore-eos", "--device", "cpu", "--experts-per-layer", "1", "--prefetch", "none"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    out = Reader(proc.stdout)
    try:
        at = out.wait_for("you> ")
        stopped = False
        for _ in range(4):  # a reply that ends (EOS) before the signal arrives: ask again
            proc.stdin.write(b"Tell me a long story about the sea.\n")
            proc.stdin.flush()
            at = out.wait_for("model> ", at)
            time.sleep(0.3)  # a few tokens in
            proc.send_signal(signal.SIGINT)
            end = out.wait_for("you> ", at)
            if "[stopped after" in out.text[at:end]:
                stopped = True
                break
            at = end
        assert stopped, out.text[-2000:]
        assert proc.poll() is None  # still running: back at the prompt
        assert "terminate called" not in out.text and "Traceback" not in out.text
        proc.send_signal(signal.SIGINT)  # at the prompt: leave
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_in_generate_says_how_far_it_got(demo_model_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "generate", "Once upon a time", "--max-new-tokens", "2000", "--device", "cpu",
                             "--experts-per-layer", "1", "--prefetch", "none", "--seed", "3", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    out = Reader(proc.stdout)
    try:
        out.wait_for("Once upon a time")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        time.sleep(0.2)
        assert code == 130 and "[stopped after" in out.text and "Traceback" not in out.text, out.text[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_during_convert_leaves_no_folder_that_loads(tmp_path: Path) -> None:
    from mixtral_offload_plugin.models.synthetic import make_random_mixtral

    src = make_random_mixtral(tmp_path / "src", hidden=256, intermediate=1024, layers=4, experts=8, vocab=256, seed=4)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([*CLI, "convert", str(src), str(dst), "--expert-bits", "2", "--method", "hqq"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**ENV, "MIXTRAL_OFFLOAD_QUIET": "0", "MIXTRAL_OFFLOAD_COMPILE": "0"})
    out = Reader(proc.stdout)
    try:
        out.wait_for("converting experts")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if code == 0:
        pytest.skip("the conversion finished before the interrupt")
    assert code == 130 and "interrupted; nothing was left half-written" in out.text, out.text[-2000:]
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial folder beside it either
