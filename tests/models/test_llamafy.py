"""Llama-fication (models/llamafy.py, export/adapter.py, `phikit convert`) on tiny random models.

Tolerance: the converted model's fp32 logits equal the original's within 1e-5 (absolute, every
position and the whole vocabulary; measured 0.0 on every architecture below: the split
projections do the same multiply-adds as the fused ones). Architectures: Phi-3 (plain RoPE),
Phi-3.5 (LongRoPE, at lengths on both sides of the switch to the long factors), phi-4 (plain RoPE,
theta 250000, grouped KV heads). Phi-4-mini (partial rotary) and a sliding window shorter than the
context are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phikit.errors import PhikitError

TOL = 1e-5
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, then count to ten."}]


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def sources(tiny_dirs, tmp_path_factory):
    """name -> a tiny directory with that model's architecture (figures of ../shared/reference/chat-formats.md)."""
    import torch

    root = tmp_path_factory.mktemp("llamafy-src")
    g = torch.Generator().manual_seed(3)
    n = 64 // 4 // 2  # head_dim 16 -> 8 rotary pairs
    longrope = {"type": "longrope", "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
                "long_factor": (2 + 20 * torch.rand(n, generator=g)).tolist()}
    return {
        "phi-3": tiny_dirs["phi3"],
        # Phi-3.5: LongRoPE from an original context of 64 (the real one: 4096 -> 131072)
        "phi-3.5": _edit_config(tiny_dirs["phi3"], root / "phi35", rope_scaling=longrope, rope_parameters=None,
                                original_max_position_embeddings=64),
        "phi-4": _edit_config(tiny_dirs["phi4"], root / "phi4", rope_parameters={"rope_type": "default", "rope_theta": 250000.0}),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    from phikit.models.llamafy import convert

    root = tmp_path_factory.mktemp("llamafy-out")
    return {name: Path(convert(str(src), root / name).out) for name, src in sources.items()}


def _logits(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return type(model).__name__, model(torch.tensor(ids)).logits.numpy(), model


@pytest.mark.parametrize("name,length", [("phi-3", 48), ("phi-3.5", 40), ("phi-3.5", 64), ("phi-3.5", 65), ("phi-3.5", 200), ("phi-4", 96)])
def test_converted_logits_equal_the_original(name, length, sources, converted):
    ids = np.random.default_rng(length).integers(0, 250, size=(2, length)).tolist()
    kind_a, a, model_a = _logits(sources[name], ids)
    kind_b, b, model_b = _logits(converted[name], ids)
    assert (kind_a, kind_b) == ("Phi3ForCausalLM", "LlamaForCausalLM")
    assert np.abs(a - b).max() <= TOL, np.abs(a - b).max()
    if name == "phi-3.5":
        # the run really used the factors of its length: the long ones past the original 64 positions
        long_used = not np.allclose(model_a.model.rotary_emb.inv_freq.numpy(), model_a.model.rotary_emb.original_inv_freq.numpy())
        assert long_used == (length > 64)
        assert np.allclose(model_b.model.rotary_emb.inv_freq.numpy(), model_a.model.rotary_emb.inv_freq.numpy())


def test_config_maps_rope_and_shape(sources, converted):
    cfg = json.loads((converted["phi-3.5"] / "config.json").read_text())
    src = json.loads((sources["phi-3.5"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    # written out for readers of either transformers generation (rope_parameters / rope_scaling)
    for rp in (cfg["rope_parameters"], cfg["rope_scaling"]):
        assert rp["rope_type"] == "longrope" and rp["original_max_position_embeddings"] == 64
        assert rp["long_factor"] == pytest.approx(src["rope_scaling"]["long_factor"])
        assert rp["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(512 / 64) / np.log(64)))
    phi4 = json.loads((converted["phi-4"] / "config.json").read_text())
    assert phi4["rope_theta"] == 250000.0 and "rope_scaling" not in phi4


@pytest.mark.parametrize("name,fmt", [("phi-3", "phi3"), ("phi-4", "phi4")])
def test_converted_dir_keeps_the_chat_format(name, fmt, converted):
    import phikit

    m = phikit.load(str(converted[name]), backend="transformers", device="cpu")
    assert m.fmt.name == fmt
    meta = json.loads((converted[name] / "phikit.json").read_text())
    assert meta["layout"] == "llama" and meta["chat_format"] == fmt and meta["phi3_config"]["model_type"] == "phi3"
    tok = m.backend.tokenizer
    assert tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == m.fmt.render(PROMPT, add_generation_prompt=True)


def test_broken_phi4_tokenizer_is_fixed_in_the_converted_dir(tiny_dirs, tmp_path):
    from transformers import AutoTokenizer

    from phikit.models.llamafy import convert

    r = convert(str(tiny_dirs["phi4-broken"]), tmp_path / "fixed")
    tok = AutoTokenizer.from_pretrained(r.out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|dummy_85|>"
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=False)
    assert not text.endswith("<|im_start|>assistant<|im_sep|>")
    assert any("EOS" in n for n in r.notes)


def test_refused_where_llama_cannot_express_the_model(tiny_dirs, tmp_path):
    from phikit.models.llamafy import LayoutError, convert

    with pytest.raises(LayoutError, match="partial_rotary_factor"):
        convert(str(tiny_dirs["phi4-mini"]), tmp_path / "a")
    with pytest.raises(LayoutError, match="already in the Llama layout"):
        convert(str(tiny_dirs["chatml"]), tmp_path / "b")
    drop = _edit_config(tiny_dirs["phi3"], tmp_path / "drop", resid_pdrop=0.1)
    with pytest.raises(LayoutError, match="resid_pdrop"):
        convert(str(drop), tmp_path / "c")
    assert not any((tmp_path / x).exists() for x in "abc")


def test_sliding_window_refused_unless_context_cut_to_it(tiny_dirs, tmp_path):
    """Phi-3-mini-4k: window 2047 of 4096. Here 32 of 512; cut to 32 the two attend alike."""
    from phikit.models.llamafy import LayoutError, convert

    src = _edit_config(tiny_dirs["phi3"], tmp_path / "win", sliding_window=32)
    with pytest.raises(LayoutError, match="--max-context 32"):
        convert(str(src), tmp_path / "x")
    with pytest.raises(LayoutError, match="outside its context"):
        convert(str(src), tmp_path / "x", max_context=1024)  # longer than the model's 512: not the same model
    out = convert(str(src), tmp_path / "y", max_context=32).out
    assert json.loads(open(f"{out}/config.json").read())["max_position_embeddings"] == 32
    ids = np.random.default_rng(0).integers(0, 250, size=(1, 32)).tolist()
    assert np.abs(_logits(src, ids)[1] - _logits(out, ids)[1]).max() <= TOL
    longer = np.random.default_rng(0).integers(0, 250, size=(1, 48)).tolist()  # past the window they differ: why it is refused
    assert np.abs(_logits(src, longer)[1] - _logits(out, longer)[1]).max() > 1e-3


def test_cli_convert(tiny_dirs, tmp_path, capsys):
    from phikit.cli.main import main

    assert main(["convert", str(tiny_dirs["phi3"]), "--to", "llama", "--out", str(tmp_path / "o"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chat_format"] == "phi3" and (tmp_path / "o" / "model.safetensors").is_file()
    assert main(["convert", str(tiny_dirs["phi3"]), "--to", "llama", "--out", str(tmp_path / "o")]) == 2  # exists, no --force
    assert main(["convert", str(tiny_dirs["phi4-mini"]), "--to", "llama", "--out", str(tmp_path / "m")]) == 2
    assert "partial_rotary_factor" in capsys.readouterr().err


# --- LoRA on the split layout, and export into either layout ---

SPLIT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def split_adapter(converted, tmp_path_factory):
    from tiny import make_adapter

    return make_adapter(converted["phi-3.5"], tmp_path_factory.mktemp("ad") / "split", SPLIT_TARGETS, seed=1)


def _peft_logits(base, adapter, ids):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_training_on_the_converted_dir_targets_separate_projections(converted, tmp_path):
    from phikit.train import make_config, train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(12)))
    s = train(make_config(data=str(data), model=str(converted["phi-3"]), out=str(tmp_path / "a"), device="cpu",
                          max_seq=64, micro_batch=2, grad_accum=1, max_steps=2, save_every=0, val_split=0.2, progress=False))
    assert sorted(s["lora_targets"]) == sorted(SPLIT_TARGETS) and s["format"] == "phi3"
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(SPLIT_TARGETS)


@pytest.mark.parametrize("layout", ["llama", "phi3"])
def test_split_adapter_merges_into_either_layout(layout, converted, split_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from phikit.export import export

    ids = [list(range(5, 75))]  # past the original 64: LongRoPE's long factors
    want = _peft_logits(converted["phi-3.5"], split_adapter, ids)
    r = export(None, adapter=split_adapter, format="merged", out=tmp_path / "m", dtype="float32", layout=layout)
    _, got, model = _logits(tmp_path / "m", ids)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[layout]
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    meta = json.loads((tmp_path / "m" / "phikit.json").read_text())
    assert meta["layout"] == layout and meta["chat_format"] == "phi3"
    if layout == "phi3":
        assert "qkv_proj" in str(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
        assert any("Phi layout" in n for n in r.notes)


def test_adapter_rewritten_for_vllm_names_both_ways(sources, converted, split_adapter, tmp_path):
    """split -> fused (for vLLM's Phi3ForCausalLM on the original) and fused -> split (its LlamaForCausalLM on the
    converted dir): each gives the logits the original adapter gives on its own layout."""
    from tiny import make_adapter

    from phikit.export import export
    from phikit.export.adapter import VLLM_MODULES

    ids = [list(range(5, 75))]
    r = export(None, adapter=split_adapter, format="adapter", layout="phi3", out=tmp_path / "fused")
    cfg = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == VLLM_MODULES["Phi3ForCausalLM"]
    assert (cfg["r"], cfg["lora_alpha"]) == (12, 24)  # rank 4 x 3 parts, alpha 8 x 3: the same alpha / r
    assert cfg["base_model_name_or_path"] == str(sources["phi-3.5"]) and r.notes
    want = _peft_logits(converted["phi-3.5"], split_adapter, ids)
    got = _peft_logits(sources["phi-3.5"], tmp_path / "fused", ids)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()

    fused = make_adapter(sources["phi-3"], tmp_path / "f3", FUSED_TARGETS, seed=2)
    export(str(converted["phi-3"]), adapter=fused, format="adapter", layout="llama", out=tmp_path / "split")
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == VLLM_MODULES["LlamaForCausalLM"] and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == str(converted["phi-3"])
    want = _peft_logits(sources["phi-3"], fused, ids)
    got = _peft_logits(converted["phi-3"], tmp_path / "split", ids)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_vllm_name_check_refuses_wrong_names():
    import torch

    from phikit.export.adapter import check_vllm_names

    w = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)}
    check_vllm_names(w, "LlamaForCausalLM")
    with pytest.raises(PhikitError, match="q_proj"):
        check_vllm_names(w, "Phi3ForCausalLM")


def test_phi3_layout_refused_for_a_plain_llama(tiny_dirs, tmp_path):
    from phikit.export import export
    from phikit.models.llamafy import LayoutError

    with pytest.raises(LayoutError, match="no Phi layout"):
        export(str(tiny_dirs["chatml"]), format="merged", layout="phi3", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gguf_from_the_llama_layout_is_llama_and_matches(converted, tmp_path):
    import gguf

    from phikit.export import export
    from phikit.export.merge import load_merged

    path = tmp_path / "p4.gguf"
    export(str(converted["phi-4"]), format="gguf", out=path, quant="f16")
    r = gguf.GGUFReader(path)
    assert r.get_field("general.architecture").contents() == "llama"
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"} <= {t.name for t in r.tensors}
    assert r.get_field("llama.rope.freq_base").contents() == 250000.0
    llama_cpp = pytest.importorskip("llama_cpp")
    m = load_merged(str(converted["phi-4"]))
    ids = m.tokenizer(m.fmt.render(PROMPT, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    import torch

    with torch.no_grad():
        ref = m.model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    rel_rms = np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean())
    assert rel_rms < 0.005, rel_rms  # the f16 bound of test_export_roundtrip


def test_gguf_of_a_longrope_llama_layout_refused_with_the_way_out(converted, tmp_path):
    from phikit.export import export

    with pytest.raises(PhikitError, match="--layout phi3"):
        export(str(converted["phi-3.5"]), format="gguf", out=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    export(str(converted["phi-3.5"]), format="gguf", out=tmp_path / "y.gguf", layout="phi3")
    import gguf

    assert gguf.GGUFReader(tmp_path / "y.gguf").get_field("general.architecture").contents() == "phi3"


def test_train_llamafy_converts_once_and_trains_the_split_layout(tiny_dirs, tmp_path, capsys):
    """`phikit train --llamafy true` on a Phi model: the base converted into OUT/base-llama, LoRA on the split
    projections, the adapter recorded against that directory and usable through phikit.load."""
    import phikit
    from phikit.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(12)))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dirs["phi3"]), "--llamafy", "true", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--max-seq", "64", "--micro-batch", "2", "--grad-accum", "1", "--max-steps", "2",
            "--save-every", "0", "--val-split", "0.2", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    meta = json.loads((out / "phikit.json").read_text())
    assert meta["base_model"] == str((out / "base-llama").resolve()) and meta["config"]["llamafy"] is True
    assert sorted(meta["lora_targets"]) == sorted(SPLIT_TARGETS) and meta["format"] == "phi3"
    assert json.loads((out / "base-llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from phikit.models.llamafy import training_copy
    from phikit.models.registry import resolve

    weights = out / "base-llama" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert training_copy(resolve(str(tiny_dirs["phi3"])), out).path == meta["base_model"]  # a resumed run: found, not redone
    assert weights.stat().st_mtime_ns == before
    tuned = phikit.load(meta["base_model"], backend="transformers", device="cpu", adapter=str(out))
    assert tuned.fmt.name == "phi3" and tuned.generate("What is 2+2?", max_tokens=3, temperature=0).finish_reason

    # a model that cannot be converted stops before anything loads, saying why and what to do
    assert main(args[:2] + [str(tiny_dirs["phi4-mini"])] + args[3:8] + [str(tmp_path / "r2")] + args[9:]) == 2
    err = capsys.readouterr().err
    assert "partial_rotary_factor" in err and "phikit convert" in err
