"""End to end on the embedded default model (SmolLM2-135M-Instruct GGUF on llama.cpp).

Real runs of the real model through the CLI and the Python API; kept few and short.
"""

import json
import subprocess
import sys

import pytest

import phikit
from phikit.chat import Conversation
from phikit.engine.types import SamplingParams
from phikit.errors import ContextLengthError

pytestmark = pytest.mark.e2e


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "phikit.cli.main", *args], capture_output=True, text=True, input=input, timeout=300)


def test_ask_json_has_every_field_and_repeats_at_temperature_zero(embedded_gguf):
    runs = [cli("ask", "Name a colour.", "--json", "--temperature", "0", "--max-tokens", "16") for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = (json.loads(r.stdout) for r in runs)
    assert set(a) >= {"text", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "model"}
    assert a["finish_reason"] in ("stop", "length") and a["model"] == "smollm2-135m"
    assert a["text"] and a["text"] == b["text"]
    assert "<|im_" not in a["text"]


def test_ask_streams_text_and_respects_stop_and_seed(default_model):
    p = dict(max_tokens=24, temperature=0.9, seed=11)
    one = default_model.generate("Count from 1 to 10.", **p)
    two = default_model.generate("Count from 1 to 10.", **p)
    assert one.text == two.text
    chunks = list(default_model.stream("Count from 1 to 10, separated by commas.", max_tokens=40, temperature=0, stop=["5"]))
    text = "".join(c.text for c in chunks)
    assert "5" not in text and len(chunks) > 2


def test_unknown_model_and_bad_device_are_one_line_errors():
    r = cli("ask", "hi", "--model", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model 'nope'") and "Traceback" not in r.stderr
    r = cli("ask", "hi", "--device", "tpu")
    assert r.returncode == 2 and "unknown device" in r.stderr


def test_prompt_over_the_context_is_a_clear_error(embedded_gguf):
    m = phikit.load(n_ctx=64)
    with pytest.raises(ContextLengthError, match="context is 64 tokens"):
        m.generate("word " * 200)


def test_chat_drops_oldest_turns_instead_of_crashing(embedded_gguf):
    m = phikit.load(n_ctx=256)
    trimmed = []
    conv = Conversation(m, on_trim=trimmed.append)
    params = SamplingParams(max_tokens=24, temperature=0)
    for i in range(8):
        list(conv.send(f"Message {i}: tell me something about the number {i}.", params))
    assert trimmed, "history should have been trimmed"
    assert conv.history[-2]["content"].startswith("Message 7")
    assert m.backend.count_tokens(m.backend.render(conv.messages())) < 256


def test_interrupted_reply_keeps_the_history(default_model):
    conv = Conversation(default_model)
    stream = conv.send("Tell me a long story.", SamplingParams(max_tokens=64, temperature=0))
    next(stream), next(stream)
    stream.close()  # what Ctrl-C does to the CLI's loop
    assert [m["role"] for m in conv.history] == ["user", "assistant"]
    list(conv.send("Shorter please.", SamplingParams(max_tokens=8, temperature=0)))
    assert len(conv.history) == 4


def test_chat_cli_commands(embedded_gguf):
    r = cli("chat", "--max-tokens", "8", "--temperature", "0", input="hello\n/system Be brief.\n/reset\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "[history cleared]" in r.stderr and "[system prompt set]" in r.stderr


def test_info_reports_parameters_and_memory(default_model):
    info = default_model.info()
    assert info["backend"] == "llamacpp" and info["parameters"] > 100_000_000
    assert 0 < info["memory_bytes"] < info["memory_bytes_16bit"]


def test_models_lists_the_registry_and_finds_the_embedded_weights(embedded_gguf):
    r = cli("models", "--json")
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(rows) >= {"smollm2-135m", "phi-3-mini-4k", "phi-3.5-mini", "phi-4-mini", "phi-4"}
    assert rows["smollm2-135m"]["weights"] == embedded_gguf
    assert rows["phi-4"]["hub_id"] == "microsoft/phi-4"
