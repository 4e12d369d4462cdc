"""Writing a GGUF file for llama.cpp / Ollama with the `gguf` package.

Tensor names come from `gguf.TensorNameMap` and metadata keys follow
llama.cpp's convert_hf_to_gguf.py (LlamaModel, Phi3MiniModel): Llama's q/k
rows are permuted to llama.cpp's rotary layout (a Phi model in the Llama layout,
models/llamafy.py, is written as `llama` the same way); Phi-3's fused qkv and gate_up
tensors go in as they are (attn_qkv, ffn_up), LongRoPE factors as
rope_factors_long/short with their attention factor, partial rotary as the
rope dimension count. Written by us rather than by calling that script because
it is not a package: it ships only in llama.cpp's source tree.

Quant types: those the gguf package quantises itself (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1) are written directly; K-quants (Q4_K_M, Q5_K_M,
Q6_K, ...) are made by llama.cpp's own quantizer from an F16 file, through
llama-cpp-python's `llama_model_quantize`, when that is installed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..errors import PhikitError, require
from .merge import Merged

log = logging.getLogger("phikit")

DIRECT = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}
# llama.cpp file types its quantizer makes (llama_ftype values, as in llama.h).
LLAMACPP = {"q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "q3_k_m": 12, "q2_k": 10}
QUANTS = tuple(DIRECT) + tuple(LLAMACPP)
ARCHS = {"llama": "LLAMA", "phi3": "PHI3"}
# llama.cpp's pre-tokenizer names for the families whose tokenizer we know (see
# convert_hf_to_gguf.py get_vocab_base_pre); anything else gets "default".
PRE = {"chatml-smollm2": "smollm", "phi4-mini": "gpt-4o"}


def write_gguf(m: Merged, path: str | Path, quant: str = "f16") -> None:
    """Write `m` to the GGUF file `path` quantised as `quant` (see QUANTS).

    Raises PhikitError for an architecture or quant type it cannot write.
    """
    path = Path(path)
    quant = quant.lower()
    if quant not in QUANTS:
        raise PhikitError(f"unknown GGUF quant {quant!r}: use one of {', '.join(QUANTS)}")
    if quant in LLAMACPP:
        _write_with_llamacpp(m, path, quant)
    else:
        _write(m, path, DIRECT[quant])


def _write_with_llamacpp(m: Merged, path: Path, quant: str) -> None:
    llama_cpp = require("llama_cpp", "llama-cpp-python", why=f"--quant {quant} needs llama.cpp's quantizer")
    f16 = path.parent / (path.name + ".f16")
    try:
        _write(m, f16, "F16")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMACPP[quant]
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params)
        if rc != 0:
            raise PhikitError(f"llama.cpp could not quantise to {quant} (code {rc}): try --quant q8_0 or q4_0")
    finally:
        f16.unlink(missing_ok=True)


def _rope(cfg) -> dict:
    """Rope settings across transformers versions (rope_parameters in v5, rope_scaling + rope_theta before)."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rp


def _permute(w, n_head: int):
    # HF stores q/k rows as [half of the rotary pairs, the other half]; llama.cpp's LLAMA rope
    # wants them interleaved (what convert_hf_to_gguf.py's LlamaModel.permute does).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(m: Merged, path: Path, qtype_name: str) -> None:
    import gguf
    import numpy as np

    cfg = m.config
    arch_name = getattr(cfg, "model_type", "?")
    if arch_name not in ARCHS:
        raise PhikitError(f"the GGUF writer knows the llama and phi3 architectures, not {arch_name!r}: export --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[arch_name])
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    n_embd, n_head = cfg.hidden_size, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or n_embd // n_head
    rp = _rope(cfg)
    w.add_name(m.spec.name + ("-merged" if m.adapter else ""))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_file_type(gguf, qtype_name))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # llama.cpp and Ollama read it to know the quant layout
    extra = {}
    if arch_name == "phi3":
        extra = _phi3_params(w, cfg, rp, n_embd, n_head)
    else:
        kind = rp.get("rope_type", "default")
        if kind == "longrope" and m.phi3_config:
            raise PhikitError(
                "this Llama-layout Phi model uses LongRoPE, two sets of rope factors switched by length, and llama.cpp's "
                "llama architecture reads one set: write the GGUF in the Phi layout (--layout phi3), which llama.cpp "
                "runs as phi3 with both")
        if kind not in ("default", None):
            raise PhikitError(f"rope scaling {kind!r} is not supported by the GGUF writer for llama models")
        w.add_rope_dimension_count(head_dim)
    _add_vocab(w, m, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in m.model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise PhikitError(f"the GGUF writer has no llama.cpp name for tensor {hf_name!r} of a {arch_name} model")
        data = t.detach().float().cpu().numpy()
        if arch_name == "llama" and stem.endswith("q_proj"):
            data = _permute(data, n_head)
        elif arch_name == "llama" and stem.endswith("k_proj"):
            data = _permute(data, n_kv)
        _add_tensor(gguf, np, w, f"{name}.{suffix}", data, qtype)
    for name, data in extra.items():
        w.add_tensor(name, data)  # rope factors stay F32, as llama.cpp reads them

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _file_type(gguf, qtype_name: str) -> int:
    return int(gguf.LlamaFileType.ALL_F32 if qtype_name == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype_name}"])


def _add_tensor(gguf, np, w, name: str, data, qtype) -> None:
    q = qtype
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        q = gguf.GGMLQuantizationType.F32  # norms and biases stay F32, as in llama.cpp's own files
    elif qtype not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        if name in ("token_embd.weight", "output.weight") and qtype != gguf.GGMLQuantizationType.Q8_0:
            # The embedding and output matrices are the most sensitive to 4/5-bit rounding;
            # llama.cpp's own 4-bit files keep them at 6-8 bits too.
            q = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[q][0]
        if data.shape[-1] % block:
            q = gguf.GGMLQuantizationType.F16  # rows that do not split into blocks: F16, as convert_hf_to_gguf does
    if q == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif q == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), q), raw_dtype=q)


def _phi3_params(w, cfg, rp: dict, n_embd: int, n_head: int) -> dict:
    import numpy as np

    rot = float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    rope_dims = int(rot * n_embd) // n_head
    max_pos = cfg.max_position_embeddings
    orig = rp.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None) or max_pos
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_scaling_orig_ctx_len(orig)
    # llama.cpp tells Phi-4-mini (no sliding window) from Phi-3 by a zero window.
    w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)
    long_f, short_f = rp.get("long_factor"), rp.get("short_factor")
    if not long_f:
        return {}
    kind = str(rp.get("rope_type") or rp.get("type") or "").lower()
    if kind not in ("longrope", "su"):
        raise PhikitError(f"phi3 rope scaling {kind!r} is not supported by the GGUF writer (LongRoPE is)")
    if len(long_f) != rope_dims // 2 or len(short_f or []) != rope_dims // 2:
        raise PhikitError(f"LongRoPE factors must have {rope_dims // 2} entries each, got {len(long_f)} and {len(short_f or [])}")
    scale = max_pos / orig
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    return {
        "rope_factors_long.weight": np.asarray(long_f, dtype=np.float32),
        "rope_factors_short.weight": np.asarray(short_f, dtype=np.float32),
    }


def _add_vocab(w, m: Merged, n_vocab: int) -> None:
    """Byte-level BPE vocabulary ("gpt2" in llama.cpp), special ids and the chat template."""
    import json

    import gguf

    tok = m.tokenizer
    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PhikitError(
            f"the GGUF writer handles byte-level BPE tokenizers; {m.spec.name}'s is "
            f"{model.get('type')}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}: "
            "export --format merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(gguf.TokenType.NORMAL if a is None else gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [" ".join(p) if isinstance(p, list) else p for p in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre(m))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if not merges:
        # llama.cpp refuses a "gpt2" vocabulary without merges and gguf cannot write an empty
        # array; one merge whose result is not in the vocabulary changes no tokenisation
        # (llama.cpp falls back to the pieces' own tokens).
        a, b = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.NORMAL and len(t) == 1][:2]
        assert a + b not in vocab
        merges = [f"{a} {b}"]
    w.add_token_merges(merges)
    for setter, tid in (
        (w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
        (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id),
    ):
        if tid is not None:
            setter(tid)
    eot = vocab.get(m.fmt.stop[0])
    if eot is not None and eot != tok.eos_token_id:
        w.add_eot_token_id(eot)  # the end-of-turn token, so llama.cpp stops there too
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    w.add_chat_template(m.fmt.hf_template())


def _pre(m: Merged) -> str:
    if m.spec.gguf_file:
        import gguf

        f = gguf.GGUFReader(m.spec.gguf_file).get_field("tokenizer.ggml.pre")
        if f is not None:
            return f.contents()
    pre = PRE.get(m.fmt.name)
    if pre is None:
        log.warning("%s: llama.cpp's pre-tokenizer for this tokenizer is unknown; using 'default'", m.spec.name)
        return "default"
    return pre
