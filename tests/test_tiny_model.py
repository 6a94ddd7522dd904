"""The built-in tiny model is a real, reproducible Hugging Face model directory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from django.core.management import call_command
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_management_command_builds_a_loadable_reproducible_model(tmp_path, chat_model):
    out = tmp_path / "tiny"
    call_command("tripod_tiny_model", "--out", str(out))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # Byte-level BPE: any text round-trips, emoji and all.
    text = "Grüße, 世界! 🙂 tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Same seed, same weights as the copy the server built.
    assert digest(out) == digest(Path(chat_model.tokenizer.name_or_path))


def test_example_websocket_client_runs_against_the_server(server):
    result = subprocess.run(
        # Greedy: at the example's default temperature the random tiny model sometimes samples EOS within 5 tokens.
        [sys.executable, "examples/ws_client.py", "Hello", "--url", server.ws_url + "/ws/chat/", "--max-tokens", "5"]
        + ["--temperature", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "finish_reason=length" in result.stdout
    assert '"completion_tokens": 5' in result.stdout
