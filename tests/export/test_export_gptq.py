"""GPTQ export through auto-round: quantise a tiny Phi-3, load it back, compare top-1 tokens;
and the bad-input cases (wrong adapter, existing OUT, interruption, bad settings)."""

from __future__ import annotations

import json

import pytest

from phikit.errors import PhikitError

pytest.importorskip("auto_round")

# Small enough for a 2-core CPU (17 s measured alone); auto-round's defaults are 200 iters x 128 x 2048 tokens.
FAST = dict(group_size=32, iters=10, nsamples=8, seqlen=64, batch_size=4)
CALIB = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "A prime number is a whole number greater than one whose only divisors are one and itself, such as 2, 3, 5 and 7.",
    "The tide rises and falls twice a day because the Moon's gravity pulls on the oceans as the Earth turns.",
]


def _calib_file(tmp_path, n: int = 12):
    """A training-style JSONL: plain text and chat records, as `phikit train` reads them."""
    p = tmp_path / "calib.jsonl"
    lines = []
    for i in range(n):
        t = CALIB[i % len(CALIB)]
        if i % 2:
            lines.append({"messages": [{"role": "user", "content": f"Tell me fact {i}."}, {"role": "assistant", "content": t}]})
        else:
            lines.append({"text": t + " " + CALIB[(i + 1) % len(CALIB)]})
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def _settings(**kw):
    from phikit.export.gptq import GPTQSettings

    return GPTQSettings(**(FAST | kw))


def test_gptq_export_loads_back_and_agrees(tiny_dirs, tmp_path):
    from phikit.export import export
    from phikit.export.gptq import load_gptq, top1_agreement
    from phikit.export.merge import load_merged

    out = tmp_path / "q"
    r = export(str(tiny_dirs["phi3"]), format="gptq", out=out, calib=str(_calib_file(tmp_path)), gptq=_settings())
    assert r.quant == "w4g32" and r.bytes == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    # What vLLM reads to pick its GPTQ kernels.
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"], q["desc_act"]) == ("gptq", 4, 32, True, False)
    meta = json.loads((out / "phikit.json").read_text())
    assert meta["format"] == "gptq" and meta["chat_format"] == "phi3" and "calib.jsonl" in meta["quantization"]["calibration"]
    assert any("8 x 64 tokens" in n for n in r.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "q"]  # no work folders left

    model, tok = load_gptq(out)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "QuantLinear"  # really 4-bit kernels
    src = load_merged(str(tiny_dirs["phi3"]))
    # The saved template renders what phikit renders.
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == src.fmt.render(msgs, add_generation_prompt=True)
    got = top1_agreement(src.model, model, src.tokenizer, src.fmt)
    # A random tiny model has nearly flat logits, so 4-bit noise flips many near-ties: 0.8-0.82 was
    # measured over 173 positions (fp32 vs w4g32). 0.6 leaves room for run-to-run variation in the
    # tuning and still fails for broken weights: measured on the same prompts, the fp32 model with
    # its two layers swapped agrees 0.10, with each layer's weight rows shuffled 0.03.
    assert got["positions"] > 100 and got["top1_agree"] >= 0.6, got


def test_gptq_refuses_existing_out_wrong_adapter_and_bad_settings(tiny_dirs, tmp_path):
    from phikit.export import export

    out = tmp_path / "q"
    out.mkdir()
    (out / "keep").write_text("precious")
    with pytest.raises(PhikitError, match="already exists.*--force"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=out, calib=str(_calib_file(tmp_path)), gptq=_settings())
    assert (out / "keep").read_text() == "precious"

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "microsoft/phi-4"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # present: the base check comes before any load
    with pytest.raises(PhikitError, match="trained on 'microsoft/phi-4', not on 'phi3'"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=tmp_path / "q2", adapter=str(adapter), calib=str(_calib_file(tmp_path)), gptq=_settings())

    with pytest.raises(PhikitError, match="--bits 5"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=tmp_path / "q3", gptq=_settings(bits=5))
    with pytest.raises(PhikitError, match="data file nope.jsonl not found"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=tmp_path / "q3", calib="nope.jsonl", gptq=_settings())
    with pytest.raises(PhikitError, match="apply to gptq exports, not gguf"):
        export(str(tiny_dirs["phi3"]), format="gguf", out=tmp_path / "q3.gguf", calib=str(_calib_file(tmp_path)))
    # Width 64 is not a multiple of 128: refused with the group sizes that fit.
    with pytest.raises(PhikitError, match="--group-size 128 does not divide.*64.*use 32 or 64 or -1"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=tmp_path / "q3", calib=str(_calib_file(tmp_path)), gptq=_settings(group_size=128))
    # Too little calibration text for one block.
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short."}) + "\n")
    with pytest.raises(PhikitError, match="fewer than one block of --seqlen 64"):
        export(str(tiny_dirs["phi3"]), format="gptq", out=tmp_path / "q3", calib=str(short), gptq=_settings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "calib.jsonl", "q", "short.jsonl"]


def test_calibration_source_order(tmp_path, shared_data):
    """--calib first, then the adapter's recorded training data, then the shared SQuAD set."""
    from phikit.export.gptq import calibration_source

    calib = _calib_file(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "phikit.json").write_text(json.dumps({"data": {"path": str(calib), "sha256": "x"}}))
    assert calibration_source(str(calib), None)[0] == calib
    path, note = calibration_source(None, str(adapter))
    assert path == calib and "adapter's training data" in note
    calib.unlink()  # the recorded file is gone: fall back to the shared set, and say so
    path, note = calibration_source(None, str(adapter))
    assert path.name == "train.json" and "squad_v2" in str(path) and "no --calib given" in note


def test_calibration_blocks_render_training_text(tiny_dirs, tmp_path):
    import torch

    from phikit.export.gptq import calibration_blocks
    from phikit.formats import FORMATS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["phi3"]))
    blocks, notes = calibration_blocks(_calib_file(tmp_path), tok, FORMATS["phi3"], _settings(nsamples=100))
    assert blocks and all(tuple(b.shape) == (1, 64) for b in blocks)
    text = tok.decode(torch.cat([b[0] for b in blocks]))
    assert "<|user|>" in text and "<|assistant|>" in text and "<|end|>" in text  # chat records in the phi3 format
    assert notes == [f"calibration: {tmp_path / 'calib.jsonl'} fills {len(blocks)} blocks of 64 tokens, not the 100 asked for"]


def test_gptq_interrupted_leaves_old_output(tiny_dirs, tmp_path, monkeypatch):
    """An interruption in the middle of quantising leaves the old OUT and no partial files."""
    import auto_round

    from phikit.export import export

    out = tmp_path / "q"
    out.mkdir()
    (out / "keep").write_text("old")

    real = auto_round.AutoRound

    def interrupted(*a, **kw):
        ar = real(*a, **kw)

        def stop(*a, **kw):
            raise KeyboardInterrupt  # as Ctrl-C during quantisation

        ar.quantize = stop
        return ar

    monkeypatch.setattr(auto_round, "AutoRound", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(tiny_dirs["phi3"]), format="gptq", out=out, force=True, calib=str(_calib_file(tmp_path)), gptq=_settings())
    assert (out / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "q"]


def test_cli_export_help_lists_gptq(capsys):
    from phikit.cli.main import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "gptq" in out and "--calib" in out and "--group-size" in out
