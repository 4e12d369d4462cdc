"""Dynamic 4-bit (issue 24) on a tiny random Phi-3: the layer with the largest NF4 error is kept in 16-bit,
named in bitsandbytes' config field, reloaded by plain transformers, and QLoRA trains it too."""

import json

import pytest

from phikit.errors import DataError, PhikitError
from phikit.models.dynamic4 import LayerError, calibration_texts, select

PLANTED = "model.layers.1.mlp.down_proj"


def _err(name, out, extra):
    return LayerError(name, extra, extra + 100, 100, weight_err=out, output_err=out, output_mse=out)


def test_select_spends_the_budget_per_extra_byte_not_by_raw_error():
    # "wide" has the largest error but costs 10x; two narrow layers remove more error for the same bytes.
    errs = [_err("wide", 0.05, 1000), _err("a", 0.03, 100), _err("b", 0.02, 100), _err("c", 0.001, 900)]
    assert select(errs, 250, "output") == ["a", "b"]
    assert select(errs, 1000, "output") == ["a", "b"]  # "wide" no longer fits after them; "c" is not worth its bytes first
    assert select(errs, 1200, "output") == ["a", "b", "wide"]
    assert select(errs, 50, "output") == []
    with pytest.raises(PhikitError, match="metric"):
        select(errs, 100, "nope")


def test_calibration_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="not found"):
        calibration_texts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c.jsonl:2"):
        calibration_texts(str(bad))
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        calibration_texts(str(empty))


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A tiny Phi-3 whose layers.1 down_proj has one outlier in every 64-weight block (NF4's block), so NF4
    rounds the rest of each block coarsely: by far the largest NF4 error of any layer."""
    import torch
    from tiny import build_model_dir
    from transformers import AutoModelForCausalLM

    d = build_model_dir("phi3", tmp_path_factory.mktemp("dyn") / "base", layers=2, hidden=64)
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        w = m.get_submodule(PLANTED).weight
        blocks = w.view(-1, 64)
        blocks[:, 0] = blocks.abs().amax(1) * 4  # every other weight of the block lands on a 4x coarser NF4 grid
    m.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def dyn_dir(planted_dir, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from phikit.cli.main import main

    root = tmp_path_factory.mktemp("dynout")
    calib = root / "calib.txt"
    calib.write_text("The Normans gave their name to Normandy, a region in France.\n\n" * 40)
    out = root / "dyn4"
    # 0.0015 of the NF4 model (mostly its 32k x 64 embedding) buys one 64 x 128 layer in 16-bit, not two.
    # --rounding nearest: these tests are about which layer is kept; GPTQ's rounding has its own test below
    rc = main(["quantize", str(planted_dir), "--dynamic", "--budget", "0.0015", "--calib", str(calib),
               "--calib-tokens", "1024", "--metric", "output", "--rounding", "nearest", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_quantize_dynamic_keeps_the_worst_layer_in_bitsandbytes_field(dyn_dir):
    rep = json.loads((dyn_dir / "phikit-quantize.json").read_text())
    worst = max(rep["layers"], key=lambda x: x["output_err"])
    assert worst["name"] == PLANTED and rep["skip_modules"] == [PLANTED]
    assert worst["kept_16bit"] and "#1 of 8" in worst["why"]
    assert all(x["output_err"] < worst["output_err"] / 3 for x in rep["layers"] if x["name"] != PLANTED)
    assert rep["calibration"]["source"].endswith("calib.txt") and rep["calibration"]["tokens"] == 1024
    q = json.loads((dyn_dir / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["bnb_4bit_quant_type"] == "nf4"
    assert set(q["llm_int8_skip_modules"]) == {PLANTED, "lm_head"}  # the default skip kept explicitly
    est = rep["memory_estimate"]
    assert est["bytes_nf4"] < est["bytes_dynamic"] <= est["bytes_nf4"] * 1.0015 < est["bytes_16bit"]


def test_dynamic_checkpoint_reloads_with_plain_transformers_and_phikit(dyn_dir, planted_dir):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    import phikit

    m = AutoModelForCausalLM.from_pretrained(dyn_dir)  # no arguments: the config carries the quantisation
    kinds = {n: type(x) for n, x in m.named_modules() if n.endswith(("_proj", "lm_head"))}
    assert kinds[PLANTED] is torch.nn.Linear and kinds["lm_head"] is torch.nn.Linear
    assert all(k is bnb.nn.Linear4bit for n, k in kinds.items() if n not in (PLANTED, "lm_head"))
    ref = AutoModelForCausalLM.from_pretrained(planted_dir)
    assert torch.equal(m.get_submodule(PLANTED).weight, ref.get_submodule(PLANTED).weight.to(torch.bfloat16))
    pm = phikit.load(str(dyn_dir), device="cpu")  # --quant none: a 4-bit checkpoint loads as saved
    assert pm.info()["quant"] == "nf4"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(pm.backend.model(ids).logits, m(ids).logits)
    with pytest.raises(PhikitError, match="saved in NF4"):
        phikit.load(str(dyn_dir), device="cpu", quant="int4")


def test_keeping_the_chosen_layer_beats_plain_nf4_and_keeping_another_of_its_size(dyn_dir, planted_dir, tmp_path):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from phikit.models.dynamic4 import bnb_config, quantize_dynamic, weight_bytes

    plain = tmp_path / "nf4"
    quantize_dynamic(str(planted_dir), plain, dynamic=False, device="cpu")
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(planted_dir, dtype=torch.bfloat16)
    other = AutoModelForCausalLM.from_pretrained(planted_dir, quantization_config=bnb_config(["lm_head", "model.layers.0.mlp.down_proj"]),
                                                 device_map={"": "cpu"}, dtype=torch.bfloat16)
    kl, size = {}, {}
    with torch.no_grad():
        p = F.log_softmax(ref(ids).logits.float(), -1)
        for name, m in (("nf4", AutoModelForCausalLM.from_pretrained(plain)), ("dyn", AutoModelForCausalLM.from_pretrained(dyn_dir)),
                        ("other", other)):
            kl[name] = float((p.exp() * (p - F.log_softmax(m(ids).logits.float(), -1))).sum(-1).mean())
            size[name] = weight_bytes(m)
    assert kl["dyn"] < min(kl["other"], kl["nf4"])
    assert size["nf4"] < size["dyn"] == size["other"] <= size["nf4"] * 1.0015


def test_quantize_refuses_a_non_empty_out_and_a_4bit_source(dyn_dir, planted_dir):
    from phikit.models.dynamic4 import quantize_dynamic

    with pytest.raises(PhikitError, match="not empty"):
        quantize_dynamic(str(planted_dir), dyn_dir, device="cpu")
    with pytest.raises(PhikitError, match="4-bit already"):
        quantize_dynamic(str(dyn_dir), dyn_dir.parent / "again", device="cpu")
    with pytest.raises(PhikitError, match="between 0 and 1"):
        quantize_dynamic(str(planted_dir), dyn_dir.parent / "again", budget=2.0, device="cpu")
    with pytest.raises(DataError, match="not found"):
        quantize_dynamic(str(planted_dir), dyn_dir.parent / "again", calib="nope.txt", device="cpu")
    assert not (dyn_dir.parent / "again").exists()


def test_qlora_trains_a_dynamic_base_with_lora_on_the_kept_layers(dyn_dir, tmp_path):
    from safetensors.torch import load_file

    from phikit.train import make_config, train

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is item {i}?", "answer": f"Item {i} is teal."}) + "\n" for i in range(8)))
    out = tmp_path / "adapter"
    summary = train(make_config(data=str(data), model=str(dyn_dir), out=str(out), device="cpu", max_seq=96, micro_batch=2,
                                grad_accum=1, lr=1e-2, max_steps=1, val_split=0.0, progress=False))
    assert summary["quant"] in ("nf4", "nf4-dynamic")
    w = load_file(str(out / "adapter_model.safetensors"))
    kept_b = [k for k in w if PLANTED.split("model.", 1)[1] in k and "lora_B" in k]
    quant_b = [k for k in w if "layers.0.mlp.down_proj" in k and "lora_B" in k]
    assert kept_b and quant_b
    # lora_B starts at zero: a non-zero B after one step means the gradient reached it, on both kinds of layer.
    assert float(w[kept_b[0]].abs().sum()) > 0 and float(w[quant_b[0]].abs().sum()) > 0


@pytest.mark.parametrize("shape", [(96, 64), (100, 70), (192, 576)])
def test_nf4_roundtrip_is_bitsandbytes_bit_for_bit(shape):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    import torch

    from phikit.models.dynamic4 import nf4_roundtrip, quant_state_bytes

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    w[0, :5] *= 40  # outliers, as real weights have
    mine, nbytes = nf4_roundtrip(w)
    q, state = bnbF.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(mine, bnbF.dequantize_4bit(q, state).float())
    assert nbytes == q.nbytes + quant_state_bytes(state)


def test_quant_nf4_dynamic_at_load_measures_once_then_uses_the_cache(planted_dir, shared_data, isolated_home, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import torch

    import phikit
    from phikit.models import dynamic4

    m = phikit.load(str(planted_dir), device="cpu", quant="nf4-dynamic")
    cached = list((isolated_home / ".phikit" / "cache" / "dynamic4").glob("*.json"))
    assert len(cached) == 1
    rec = json.loads(cached[0].read_text())
    assert rec["report"]["calibration"]["source"].startswith("shared SQuAD 2.0 train contexts")
    kept = [n for n in rec["skip"] if n not in rec["report"]["default_skips"]]
    assert kept and all(type(m.backend.model.get_submodule(n)) is torch.nn.Linear for n in kept)
    monkeypatch.setattr(dynamic4, "measure_layers", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again = phikit.load(str(planted_dir), device="cpu", quant="nf4-dynamic")
    assert all(type(again.backend.model.get_submodule(n)) is torch.nn.Linear for n in kept)


def test_quant_nf4_dynamic_refuses_a_gguf_and_names_phikit_quantize(embedded_gguf):
    from phikit.errors import DeviceError
    from phikit.models.loading import load_hf
    from phikit.models.registry import resolve

    with pytest.raises(DeviceError, match="phikit quantize"):
        load_hf(resolve(embedded_gguf), quant="nf4-dynamic", device="cpu")


def test_qlora_with_quant_nf4_dynamic_on_a_16bit_model(planted_dir, shared_data, isolated_home, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from phikit.train import make_config, train

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is item {i}?", "answer": f"Item {i} is teal."}) + "\n" for i in range(8)))
    out = tmp_path / "adapter"
    summary = train(make_config(data=str(data), model=str(planted_dir), out=str(out), device="cpu", max_seq=96, micro_batch=2,
                                grad_accum=1, lr=1e-2, max_steps=1, val_split=0.0, progress=False, quant="nf4-dynamic"))
    assert summary["quant"] == "nf4-dynamic"
    rec = json.loads(next((isolated_home / ".phikit" / "cache" / "dynamic4").glob("*.json")).read_text())
    kept = [n for n in rec["skip"] if n not in rec["report"]["default_skips"]]
    w = load_file(str(out / "adapter_model.safetensors"))
    for n in kept:  # each layer kept in 16-bit got LoRA, and its B moved off zero in the one step
        b = [k for k in w if n.split("model.", 1)[1] + ".lora_B" in k]
        assert b and float(w[b[0]].abs().sum()) > 0, n


def test_calibration_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    from phikit.errors import DataError
    from phikit.models.dynamic4 import calibration_texts

    p = tmp_path / "calib.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"calib\.jsonl:1: not valid UTF-8"):
        calibration_texts(str(p))


def test_packed_codes_and_state_are_what_bitsandbytes_makes_of_the_same_codes():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF
    import torch

    from phikit.models.dynamic4 import nf4_state, pack_nf4

    w = (torch.randn(48, 192, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    q, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    code = bnbF.get_4bit_type("nf4", device="cpu").float()
    blocks = w.float().view(-1, 64)
    absmax = blocks.abs().amax(1)
    codes = torch.bucketize(blocks / absmax[:, None], (code[1:] + code[:-1]) / 2).to(torch.uint8).view(48, 192)
    packed, mine = pack_nf4(codes), nf4_state(absmax, state.shape, state.dtype)
    assert torch.equal(packed, q)
    assert torch.equal(bnbF.dequantize_4bit(packed, mine), bnbF.dequantize_4bit(q, state))


def test_gptq_nf4_keeps_less_output_error_than_nearest_rounding():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF
    import torch

    from phikit.models.dynamic4 import gptq_nf4

    g = torch.Generator().manual_seed(0)
    # inputs with correlated features (as activations have), so compensating across columns can pay
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * 0.05
    codes, absmax = gptq_nf4(w, x.T @ x)
    code = bnbF.get_4bit_type("nf4", device="cpu").float()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and absmax.shape == (64 * 2,)
    wb = w.to(torch.bfloat16).float()
    wg = (code[codes.long()].view(64, 2, 64) * absmax.view(64, 2, 1)).view(64, 128)
    am = wb.view(64, 2, 64).abs().amax(-1, keepdim=True)
    wn = (code[torch.bucketize(wb.view(64, 2, 64) / am, (code[1:] + code[:-1]) / 2)] * am).view(64, 128)
    err_g, err_n = float((x @ (wg - wb).T).pow(2).sum()), float((x @ (wn - wb).T).pow(2).sum())
    assert err_g < 0.8 * err_n
    with pytest.raises(ValueError, match="multiple of 64"):
        gptq_nf4(torch.randn(8, 96), torch.eye(96))


def test_gptq_rounded_checkpoint_loads_plainly_and_beats_nearest_on_text_like_its_calibration(planted_dir, tmp_path):
    """GPTQ's codes make an ordinary NF4 checkpoint (plain transformers loads it, every layer Linear4bit) whose
    next-token distributions on held-out text of the calibration's kind are closer to the 16-bit model's."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phikit.models.dynamic4 import quantize_dynamic

    words = "alpha river stone cloud market yellow quiet engine paper forest seven orbit candle violin harbor tiger".split()

    def text(seed, n):
        g = torch.Generator().manual_seed(seed)
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(text(s, 60) for s in range(40)))
    outs = {}
    for r in ("nearest", "gptq"):
        outs[r] = tmp_path / r
        rep = quantize_dynamic(str(planted_dir), outs[r], dynamic=False, rounding=r, calib=str(calib), calib_tokens=1024, device="cpu")
        assert rep["rounding"] == r
    assert rep["gptq"]["layers"] == 8 and all(v < 1 for v in rep["gptq"]["output_err_vs_nearest"].values())
    tok = AutoTokenizer.from_pretrained(planted_dir)
    ids = torch.tensor([tok(text(100 + i, 200))["input_ids"][:128] for i in range(4)])  # held out: other draws
    ref = AutoModelForCausalLM.from_pretrained(planted_dir, dtype=torch.bfloat16)
    kl = {}
    with torch.no_grad():
        p = F.log_softmax(ref(ids).logits.float(), -1)
        for r, d in outs.items():
            m = AutoModelForCausalLM.from_pretrained(d)  # no arguments
            assert all(type(x) is bnb.nn.Linear4bit for n, x in m.named_modules() if n.endswith("_proj"))
            kl[r] = float((p.exp() * (p - F.log_softmax(m(ids).logits.float(), -1))).sum(-1).mean())
    assert kl["gptq"] < 0.5 * kl["nearest"]
