"""Network surfaces and text edge cases: nothing opens a port unless asked, the demo binds loopback by default."""

from __future__ import annotations

import psutil
import torch

from mixtral_offload_plugin import OffloadConfig, load_model
from mixtral_offload_plugin.cli import build_parser, main


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_loading_and_generating_open_no_port(demo_model_path):
    before = _listening()
    model = load_model(demo_model_path, OffloadConfig(device="cpu", experts_per_layer=4, store="disk",
                                                      prefetch="gate"))
    model.generate(torch.tensor([[1, 40, 50]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    from langchain_integration import MixtralOffloadLLM

    MixtralOffloadLLM(model=model, max_tokens=3, temperature=0).invoke("The")
    assert _listening() == before
    model.unload()


def test_demo_binds_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and not args.share
    assert build_parser().parse_args(["demo", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_prompt_with_invalid_utf8_is_replaced_not_fatal(demo_model_path, capsys):
    bad = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")
    assert main(["generate", bad, "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    assert "caf\ufffd" in capsys.readouterr().out
