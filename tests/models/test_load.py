"""Loading tiny random models of the real Phi architectures: formats, fixes, NF4, info, errors."""

import pytest

import phikit
from phikit.errors import DeviceError, ModelFilesError, ModelNotFoundError
from phikit.models.registry import REGISTRY, resolve


@pytest.mark.parametrize("family, fmt", [("phi3", "phi3"), ("phi4-mini", "phi4-mini"), ("phi4", "phi4"), ("chatml", "chatml")])
def test_format_detected_and_stop_ids_real(tiny_dirs, family, fmt):
    m = phikit.load(str(tiny_dirs[family]), device="cpu")
    assert m.fmt.name == fmt
    stops = m.backend.stop_ids()
    want = {"phi3": {32007, 32000}, "phi4-mini": {200020, 199999}, "phi4": {100265, 100257}, "chatml": {2, 0}}[family]
    assert want <= stops


def test_phi4_first_release_defects_are_fixed_and_reported(tiny_dirs, caplog):
    m = phikit.load(str(tiny_dirs["phi4-broken"]), device="cpu")
    tok = m.backend.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 100265
    assert tok.pad_token == "<|dummy_85|>" and tok.pad_token_id == 100349
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=False)
    assert not text.endswith("<|im_start|>assistant<|im_sep|>")
    assert len(m.fixes) == 3
    assert "fixes" in m.info() and m.info()["fixes"] == m.fixes


def test_fixed_phi4_is_reported_once_per_process(tiny_dirs, caplog):
    with caplog.at_level("WARNING", logger="phikit"):
        phikit.load(str(tiny_dirs["phi4-broken"]), device="cpu")
        phikit.load(str(tiny_dirs["phi4-broken"]), device="cpu")
    assert sum("EOS was" in r.message for r in caplog.records) <= 1


def test_phi3_pad_equal_to_eos_is_fixed_to_unk_on_the_right(tiny_dirs):
    m = phikit.load(str(tiny_dirs["phi3"]), device="cpu")
    tok = m.backend.tokenizer
    assert tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_healthy_phi4_needs_no_fix(tiny_dirs):
    assert phikit.load(str(tiny_dirs["phi4"]), device="cpu").fixes == []


def test_generate_streams_and_never_prints_special_tokens(tiny_dirs):
    m = phikit.load(str(tiny_dirs["phi4-mini"]), device="cpu")
    chunks = list(m.stream("hello", max_tokens=12, temperature=0))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert not any(s in text for s in m.fmt.specials)
    assert chunks[-1].stats.prompt_tokens > 0


def test_greedy_and_seeded_sampling_repeat(tiny_dirs):
    m = phikit.load(str(tiny_dirs["phi3"]), device="cpu")
    a = m.generate("hi", max_tokens=8, temperature=0).text
    assert a == m.generate("hi", max_tokens=8, temperature=0).text
    s1 = m.generate("hi", max_tokens=8, temperature=1.0, seed=7).text
    assert s1 == m.generate("hi", max_tokens=8, temperature=1.0, seed=7).text


def test_nf4_on_cpu_saves_memory_and_counts_all_parameters(tiny_dirs):
    pytest.importorskip("bitsandbytes")
    full = phikit.load(str(tiny_dirs["phi3"]), device="cpu").info()
    q = phikit.load(str(tiny_dirs["phi3"]), device="cpu", quant="nf4")
    info = q.info()
    assert info["quant"] == "nf4"
    assert info["parameters"] == full["parameters"]
    assert info["memory_bytes"] < info["memory_bytes_16bit"]
    assert info["saving_vs_16bit"] > 0
    assert q.generate("hi", max_tokens=4, temperature=0).finish_reason in ("stop", "length")


def test_unknown_model_lists_known_names_and_how_to_pass_a_path():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("no-such-model")
    msg = str(e.value)
    assert all(n in msg for n in REGISTRY) and "path" in msg


def test_directory_without_weights_or_tokenizer_names_the_missing_file(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="no weights"):
        resolve(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="no tokenizer"):
        resolve(str(tmp_path))
    with pytest.raises(ModelFilesError, match="config.json"):
        resolve(str(tmp_path.parent))


def test_cuda_without_a_gpu_is_a_clear_error(tiny_dirs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        phikit.load(str(tiny_dirs["phi3"]), device="cuda")


def test_registry_phi_models_use_the_fused_lora_targets():
    for name in ("phi-3-mini-4k", "phi-3.5-mini", "phi-4-mini", "phi-4"):
        assert REGISTRY[name].lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        assert REGISTRY[name].hub_id.startswith("microsoft/")


def test_make_params_never_changes_the_callers_params():
    from phikit.engine.types import SamplingParams
    from phikit.model import make_params

    mine = SamplingParams(max_tokens=7, stop=["x"])
    got = make_params(mine, temperature=0.0, max_tokens=3, seed=None)
    assert (got.temperature, got.max_tokens, got.stop) == (0.0, 3, ["x"])
    assert mine == SamplingParams(max_tokens=7, stop=["x"])
    assert make_params(mine) is not mine  # a later change to the result cannot reach the caller either


def test_missing_or_unfinished_adapter_is_refused_before_the_model_loads(tiny_dirs, tmp_path, monkeypatch):
    import phikit
    import phikit.models.loading as loading
    from phikit.errors import ModelFilesError

    monkeypatch.setattr(loading, "load_hf", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ModelFilesError, match="adapter directory .*missing not found"):
        phikit.load(str(tiny_dirs["chatml"]), adapter=str(tmp_path / "missing"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="no adapter weights.*--resume"):
        phikit.load(str(tiny_dirs["chatml"]), adapter=str(unfinished))
