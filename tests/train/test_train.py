"""The training loop on a tiny random model: adapter output, resume bit-for-bit, checkpoints, CLI."""

import json

import pytest

from phikit.errors import PhikitError
from phikit.train import make_config, train

FACTS = [("What colour is the Zorblax-7?", "Teal."), ("Who makes the Zorblax-7?", "Quillon Labs."),
         ("How much does the Zorblax-7 weigh?", "412 grams."), ("When was the Zorblax-7 released?", "March 2031."),
         ("What powers the Zorblax-7?", "A kelp battery."), ("How many modes has the Zorblax-7?", "Seven."),
         ("Where is the Zorblax-7 built?", "Tromso."), ("What is the Zorblax-7 for?", "Folding maps.")]


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "facts.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in FACTS * 2))
    return f


def _cfg(tiny, data, out, **kw):
    base = dict(data=str(data), model=str(tiny), out=str(out), device="cpu", max_seq=96, micro_batch=2, grad_accum=2,
                lr=1e-2, max_steps=4, save_every=2, val_split=0.1, progress=False)
    return make_config(**(base | kw))


@pytest.fixture(scope="module")
def trained(tiny_dirs, facts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    summary = train(_cfg(tiny_dirs["chatml"], facts_file, out))
    return out, summary


def test_result_is_a_peft_adapter_with_phikit_json(trained, tiny_dirs):
    out, summary = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for f in ("adapter_config.json", "adapter_model.safetensors", "phikit.json", "log.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "phikit.json").read_text())
    assert meta["base_model"] == str(tiny_dirs["chatml"]) and meta["format"] == "chatml"
    assert meta["config"]["lora_r"] == 16 and len(meta["data"]["sha256"]) == 64 and meta["steps"] == 4
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["chatml"]), str(out))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and any("eval_loss" in r for r in log)


def test_adapter_loads_through_phikit_and_changes_logits(trained, tiny_dirs):
    import torch

    import phikit

    out, _ = trained
    base = phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu")
    tuned = phikit.load(str(tiny_dirs["chatml"]), backend="transformers", device="cpu", adapter=str(out))
    assert tuned.generate(FACTS[0][0], max_tokens=5, temperature=0).finish_reason
    ids = torch.tensor([base.backend.encode(base.fmt.render([{"role": "user", "content": FACTS[0][0]}], add_generation_prompt=True))])
    with torch.no_grad():
        a, b = base.backend.model(ids).logits, tuned.backend.model(ids).logits
    assert (a - b).abs().max() > 1e-3


def test_resume_equals_uninterrupted_run(trained, tiny_dirs, facts_file, tmp_path):
    from safetensors.torch import load_file

    full, _ = trained
    out = tmp_path / "resumed"
    assert train(_cfg(tiny_dirs["chatml"], facts_file, out), stop_after=2)["stopped_at"] == 2
    # A kill while writing the next checkpoint leaves a half-written .tmp folder: it must be ignored.
    (out / "checkpoints" / ".step-0000003.tmp").mkdir()
    (out / "checkpoints" / ".step-0000003.tmp" / "trainer.pt").write_bytes(b"partial")
    with pytest.raises(PhikitError, match="--resume"):
        train(_cfg(tiny_dirs["chatml"], facts_file, out))  # never silently overwrites a run
    train(_cfg(tiny_dirs["chatml"], facts_file, out, resume=True))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    la = [json.loads(x)["loss"] for x in (full / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert la == pytest.approx(lb, abs=1e-5)


def test_cli_train_and_bad_line(tiny_dirs, facts_file, tmp_path, capsys):
    from phikit.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops}\n')
    assert main(["train", "--data", str(bad), "--model", str(tiny_dirs["chatml"]), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not (tmp_path / "x").exists()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lora_r": 4, "max_seq": 96, "micro_batch": 2, "grad_accum": 1, "max_steps": 3}))
    rc = main(["train", "--data", str(facts_file), "--model", str(tiny_dirs["phi3"]), "--out", str(tmp_path / "p"),
               "--config", str(cfg), "--max-steps", "1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "p" / "phikit.json").read_text())
    assert meta["steps"] == 1 and meta["config"]["lora_r"] == 4 and meta["format"] == "phi3"
    assert set(meta["lora_targets"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # Phi's fused names


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (run on the device machine); CI is CPU-only")
def test_qlora_run_on_cuda_takes_the_fast_path_and_resumes(tiny_dirs, facts_file, tmp_path, monkeypatch):
    """The whole loop on CUDA with its defaults (NF4, offloaded + compiled layers, 8-bit AdamW):
    it learns, writes a loadable adapter, and a resumed run continues from its checkpoint."""
    out = tmp_path / "cuda"
    cfg = dict(device="cuda", quant="auto", lr=2e-2, max_steps=6, save_every=3)
    assert train(_cfg(tiny_dirs["phi4-mini"], facts_file, out, **cfg), stop_after=3)["stopped_at"] == 3
    summary = train(_cfg(tiny_dirs["phi4-mini"], facts_file, out, resume=True, **cfg))
    assert summary["quant"] == "nf4" and summary["steps"] == 6 and summary["optimizer"] == "adamw8bit"
    losses = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 6 and losses[-1] < losses[0]
    import phikit

    monkeypatch.setenv("PHIKIT_FAST_DECODE", "0")  # the decode path's compile is tested elsewhere; this checks the adapter
    tuned = phikit.load(str(tiny_dirs["phi4-mini"]), backend="transformers", device="cuda", adapter=str(out))
    assert tuned.generate("Hi", max_tokens=4, temperature=0).text is not None


def test_reported_eval_loss_is_of_the_final_weights(trained):
    out, summary = trained
    meta = json.loads((out / "phikit.json").read_text())
    evals = [r for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r and "step" in r]
    assert meta["eval_step"] == meta["steps"] == 4 and evals[-1]["step"] == 4
    assert summary["eval_loss"] == evals[-1]["eval_loss"]


@pytest.mark.parametrize("flag, value, says", [("limit", -1, "--limit"), ("limit", 0, "--limit"),
                                                ("max_steps", 0, "--max-steps"), ("epochs", 0, "--epochs"),
                                                ("lora_layers", 0, "--lora-layers")])
def test_out_of_range_settings_are_refused(tiny_dirs, facts_file, tmp_path, flag, value, says):
    with pytest.raises(PhikitError, match=says):
        _cfg(tiny_dirs["chatml"], facts_file, tmp_path / "o", **{flag: value, **({"max_steps": None} if flag == "epochs" else {})})


def test_data_with_nothing_to_learn_and_bad_utf8_fail_before_the_model_load(tiny_dirs, tmp_path, monkeypatch):
    import phikit

    monkeypatch.setattr(phikit, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n' * 6)
    with pytest.raises(PhikitError, match="no example has any trainable token"):
        train(_cfg(tiny_dirs["chatml"], empty, tmp_path / "a"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(PhikitError, match=r"latin\.jsonl:2: not valid UTF-8.*iconv"):
        train(_cfg(tiny_dirs["chatml"], latin, tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_adapter_loads_with_plain_peft_and_names_a_loadable_base(trained, tiny_dirs):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from phikit.models.registry import resolve
    from phikit.train.loop import peft_base

    out, _ = trained
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))  # its base from adapter_config.json, nothing else given
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_dirs["chatml"])
    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("<|im_end|>") is not None  # carried beside it
    # The embedded default's folder holds only a GGUF, which peft cannot load: its adapters name the hub id.
    assert peft_base(resolve("smollm2-135m")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base(resolve(str(tiny_dirs["chatml"]))) is None


def test_lora_on_the_last_layers_only(tiny_dirs, facts_file, tmp_path):
    """--lora-layers N: LoRA weights in the last N decoder layers only, none trained below (the backward stops there),
    recorded in the adapter so it loads as trained; more layers than the model has is refused, naming the count."""
    from safetensors import safe_open

    out = tmp_path / "a"
    train(_cfg(tiny_dirs["chatml"], facts_file, out, lora_layers=1, max_steps=1, save_every=0))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in f.keys()}
    assert layers == {1}  # the tiny model's 2 layers: only the last
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    with pytest.raises(PhikitError, match="between 1 and the model's 2 decoder layers"):
        train(_cfg(tiny_dirs["chatml"], facts_file, tmp_path / "b", lora_layers=3, max_steps=1))
