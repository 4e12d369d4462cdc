"""Dynamic 4-bit (issue 24): NF4 everywhere except the linear layers that lose most to it.

Quantising every linear layer to NF4 treats them as equal; they are not. Each
candidate layer (every `nn.Linear` that plain NF4 would quantise) is measured
on calibration text: its weight error from an NF4 round trip (bitsandbytes'
own quantiser, block 64, double quantisation, from bf16 as a load does) and
the change in its output, with forward hooks on the 16-bit model (each layer
sees the 16-bit model's inputs). The worst layers, per extra byte, are kept in
16-bit within a memory budget (a fraction of the plain NF4 model's memory),
and the checkpoint is saved pre-quantised with the kept names in
bitsandbytes' own config field, `llm_int8_skip_modules` (transformers applies
it to 4-bit too), so plain `AutoModelForCausalLM.from_pretrained(DIR)` loads
it. Calibration text is the user's file, else the shared SQuAD 2.0 train
contexts; never the Hub.

The layers that stay NF4 are rounded onto the NF4 grid by GPTQ's error compensation (`gptq_nf4`) rather
than to the nearest code: each column's rounding error is spread over the columns not yet rounded, weighted
by the calibration inputs' second moments, so the layer's *output* error is what is kept small. The
checkpoint stays plain bitsandbytes NF4 (the same codes, block-64 absmax and double quantisation; only
which code each weight gets differs), so nothing that loads it needs to know.

    report = quantize_dynamic("phi-4-mini", "phi-4-mini-dyn4/", budget=0.10)
    skip = dynamic_skip_modules(spec, "cuda")      # what --quant nf4-dynamic uses (cached)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError, PhikitError
from .registry import ModelSpec, phikit_home, resolve

log = logging.getLogger("phikit")

DEFAULT_BUDGET = 0.10
DEFAULT_CALIB_TOKENS = 8192
SEQ_LEN = 512
# output: relative change of the layer's output on calibration text; weight: relative weight error;
# output_mse: mean squared change of the output (absolute, so layers writing larger values weigh more);
# fisher: the output change seen through the model's own next-token distribution (see measure_layers), an
# estimate of the KL divergence that quantising that layer alone adds, so layers compare in one unit.
METRICS = ("output", "weight", "output_mse", "fisher")
# gptq: the NF4 layers' codes chosen by GPTQ's error compensation (gptq_nf4); nearest: bitsandbytes' own rounding.
ROUNDINGS = ("gptq", "nearest")
# GPTQ's calibration: at least this many tokens per input feature of the widest layer. A layer's X^T X has rank
# at most the number of tokens it saw; with fewer than its input width, GPTQ compensates only in the directions
# the calibration happened to span (phi-4's down_proj reads 17,920 features: 71,680 tokens; SmolLM2's widest
# 1,536: the 8,192 of the layer measurement already cover it).
GPTQ_TOKENS_PER_INPUT = 4
# GPTQ's damping, a fraction of X^T X's mean diagonal added to it. GPTQ's own default is 0.01; on the embedded
# model 0.1 closed more of the KL gap on held-out text (dynamic NF4: 58% at 0.01, 61% at 0.1, 60% at 0.3;
# benchmarks/research/dynamic_nf4_variants.py, results/dynamic_nf4_research_cpu.jsonl).
GPTQ_DAMP = 0.1
HESSIAN_BYTES = 1 << 30  # the layers' X^T X collected per pass over the calibration text (more layers: more passes)
DEFAULT_METRIC = "fisher"  # ranked layers best on the embedded model: benchmarks/results/dynamic_nf4_cpu.jsonl (row final)
REPORT_FILE = "phikit-quantize.json"


@dataclass
class LayerError:
    name: str
    params: int
    bytes_16bit: int
    bytes_nf4: int
    weight_err: float  # ||W - nf4(W)||^2 / ||W||^2
    output_err: float  # ||XW' - X nf4(W)'||^2 / ||XW'||^2 over the calibration tokens
    output_mse: float  # ||XW' - X nf4(W)'||^2 / number of output values
    fisher: float = 0.0  # mean over tokens of (dY . d log p(y~)/dY)^2 / 2, y~ drawn from the model: ~ KL added

    @property
    def extra_bytes(self) -> int:
        return self.bytes_16bit - self.bytes_nf4

    def score(self, metric: str) -> float:
        return {"output": self.output_err, "weight": self.weight_err, "output_mse": self.output_mse, "fisher": self.fisher}[metric]


# ---- calibration text ----

def calibration_texts(path: str | None = None) -> tuple[list[str], str]:
    """(texts, description) from a user's file, else the shared SQuAD 2.0 train contexts.

    .json: SQuAD-format contexts; .jsonl: each line's text / context / messages / question+answer;
    any other file: its paragraphs. Raises DataError for a missing or empty file."""
    if path is None:
        from ..train.data import resolve_data_path

        p = resolve_data_path("squad2")
        return squad_contexts(p), f"shared SQuAD 2.0 train contexts ({p.name})"
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"calibration file {path} not found: pass a .txt/.md, .jsonl or SQuAD .json file (or leave --calib out)")
    if p.suffix == ".json":
        texts = squad_contexts(p)
    elif p.suffix == ".jsonl":
        from ..train.data import jsonl_objects

        texts = [_record_text(r, where) for where, r in jsonl_objects(p)]
    else:
        texts = [t.strip() for t in p.read_text(encoding="utf-8", errors="replace").split("\n\n") if t.strip()]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{p}: no text to calibrate on: give it some text (or leave --calib out for the SQuAD contexts)")
    return texts, str(p)


def _record_text(r, where: str) -> str:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object with text, context, messages or question/answer")
    if isinstance(r.get("text"), str):
        return r["text"]
    if isinstance(r.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in r["messages"] if isinstance(m, dict))
    parts = [str(r[k]) for k in ("context", "question", "answer") if isinstance(r.get(k), str)]
    if not parts:
        raise DataError(f"{where}: no text field: give text, context, messages or question/answer")
    return "\n".join(parts)


def squad_contexts(path: Path) -> list[str]:
    """The distinct paragraphs of a SQuAD-format file, in file order."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        seen: dict[str, None] = {}
        for art in data:
            for para in art["paragraphs"]:
                seen.setdefault(para["context"], None)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a SQuAD-format JSON file ({type(e).__name__}: {e}); pass .txt or .jsonl text instead") from None
    return list(seen)


def token_batches(tok, texts: list[str], max_tokens: int, seq_len: int = SEQ_LEN, batch: int = 4):
    """LongTensor batches [b, seq_len] cut from the texts joined by blank lines, up to max_tokens tokens."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        seq_len, n = len(ids), 1 if ids else 0
    if n == 0:
        raise DataError("the calibration text gave no tokens: give more text")
    rows = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return list(rows.split(batch))


# ---- measuring ----

_NF4: dict = {}


def nf4_roundtrip(w):
    """(NF4-then-back copy of w in w's dtype, bytes NF4 stores) as a bitsandbytes load makes it: block 64 from
    bf16, the nearest NF4 value, the absmax double-quantised (8-bit blockwise over 256, less its mean).
    Equal, bit for bit, to bitsandbytes' quantize_4bit + dequantize_4bit (tested), at a fraction of its CPU
    time, since only the small absmax vector goes through bitsandbytes."""
    import bitsandbytes.functional as F
    import torch
    import torch.nn.functional as tF

    code, _ = nf4_table(w.device)
    flat = w.detach().to(torch.bfloat16).float().reshape(-1)
    n = flat.numel()
    idx, absmax = nf4_nearest(tF.pad(flat, (0, -n % 64)).view(-1, 64))
    offset = absmax.mean()
    q2, s2 = F.quantize_blockwise((absmax - offset).cpu(), blocksize=256)
    am = F.dequantize_blockwise(q2, s2).to(w.device) + offset
    return (code[idx] * am[:, None]).reshape(-1)[:n].view(w.shape).to(torch.bfloat16).to(w.dtype), nf4_bytes(n)


def nf4_table(dev):
    """(NF4's 16 values, the 15 midpoints between them) as fp32 on `dev`: a value's nearest code is its bucket."""
    import bitsandbytes.functional as F

    if dev not in _NF4:
        code = F.get_4bit_type("nf4", device="cpu").float().to(dev)
        _NF4[dev] = (code, (code[1:] + code[:-1]) / 2)
    return _NF4[dev]


def nf4_nearest(blocks):
    """(codes, absmax) of fp32 `blocks` [..., 64] as bitsandbytes rounds them: each value to the nearest NF4 code
    of the block's absmax scale. codes are indices into nf4_table's values; absmax is [...]."""
    import torch

    _, mids = nf4_table(blocks.device)
    absmax = blocks.abs().amax(-1)
    return torch.bucketize(blocks / absmax.clamp_min(1e-30)[..., None], mids), absmax


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes holds for an NF4 weight of `numel` values: packed pairs, a uint8 absmax per 64,
    the 16-value code, the offset, and the nested state (fp32 absmax per 256 blocks, its 256-value code)."""
    blocks = -(-numel // 64)
    return (numel + 1) // 2 + blocks + 16 * 4 + 4 + (-(-blocks // 256)) * 4 + 256 * 4


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, offset and the nested state's)."""
    import torch

    n = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            n += t.nbytes
    if getattr(state, "state2", None) is not None:
        n += quant_state_bytes(state.state2)
    return n


def candidate_layers(model) -> dict:
    """name -> nn.Linear for every layer plain NF4 quantises (transformers keeps its default skips, the LM head
    among them, in 16-bit)."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = get_keys_to_not_convert(model)
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and should_convert_module(n, keep)}


def default_skips(model) -> list[str]:
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(get_keys_to_not_convert(model))


def measure_layers(model, batches, fisher: bool = True) -> list[LayerError]:
    """Each candidate layer's NF4 error: weight error, and the change dY of its output on `batches` (forward
    hooks on the 16-bit model: each layer's output against the same input through its NF4 copy).

    With `fisher`, also dY seen through the model's own next-token distribution: for a next token y~ drawn
    from the model, g = d log p(y~)/dY by a backward pass, and (dY . g)^2 / 2 averaged over tokens is the
    second-order estimate (the Fisher quadratic form) of the KL divergence that quantising this layer alone
    adds. A relative output error cannot tell whether the layer's output matters downstream; this can, and
    it puts every layer in one unit (KL), which the budget's per-byte comparison needs."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    layers = candidate_layers(model)
    if not layers:
        raise PhikitError(f"{type(model).__name__} has no linear layers that NF4 would quantise")
    acc = {n: [0.0, 0.0, 0, 0.0] for n in layers}
    # Keep each layer's NF4 copy between batches when all of them fit in 2 GB; else remake it per batch.
    keep = len(batches) > 1 and sum(m.weight.nbytes for m in layers.values()) <= 2 << 30
    cache: dict = {}

    def hook(name):
        def fn(mod, inp, out):
            wq = cache.get(name)
            if wq is None:
                wq = nf4_roundtrip(mod.weight)[0]
                if keep:
                    cache[name] = wq
            with torch.no_grad():
                d = (out - F.linear(inp[0], wq, mod.bias)).float()
                a = acc[name]
                a[0] += float(d.pow(2).sum())
                a[1] += float(out.float().pow(2).sum())
                a[2] += d.numel()
            if out.requires_grad:
                def on_grad(g, d=d, a=acc[name]):
                    a[3] += float(((d * g.float()).sum(-1)).pow(2).sum()) / 2
                out.register_hook(on_grad)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    dev = next(model.parameters()).device
    emb = model.get_input_embeddings().weight
    was = emb.requires_grad
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens = 0
    try:
        emb.requires_grad_(fisher)  # so the activations carry gradients; no weight gradient is kept
        for b in tqdm(batches, desc="measuring NF4 error per layer", unit="batch"):
            with torch.set_grad_enabled(fisher):
                logits = model(input_ids=b.to(dev), use_cache=False).logits.float()
            if fisher:
                logp = F.log_softmax(logits, -1)
                with torch.no_grad():
                    y = torch.multinomial(logp.detach().exp().view(-1, logp.shape[-1]), 1, generator=gen)
                logp.view(-1, logp.shape[-1]).gather(1, y).sum().backward()
                tokens += y.numel()
            del logits
    finally:
        for h in handles:
            h.remove()
        emb.requires_grad_(was)
        emb.grad = None
    out = []
    for n, m in layers.items():
        w = m.weight.detach()
        wq = cache.pop(n, None)
        if wq is None:
            wq = nf4_roundtrip(w)[0]
        werr = float((w.float() - wq.float()).pow(2).sum() / w.float().pow(2).sum().clamp_min(1e-30))
        sq, ref, cnt, fis = acc[n]
        bias = m.bias.numel() * 2 if m.bias is not None else 0
        out.append(LayerError(n, w.numel(), w.numel() * 2 + bias, nf4_bytes(w.numel()) + bias, werr, sq / max(ref, 1e-30),
                              sq / max(cnt, 1), fis / max(tokens, 1)))
    return out


def select(errors: list[LayerError], budget_bytes: float, metric: str = DEFAULT_METRIC) -> list[str]:
    """The layers to keep in 16-bit: greedily, the highest error per extra byte first, skipping any that no
    longer fits the budget.

    Why per byte: keeping a layer removes (to first order) its own error and costs its extra bytes, so this is
    a knapsack, and filling by value per weight is its standard near-optimal greedy. Ranking by error alone
    spends the budget on the widest layers (an MLP projection holds 2.7x an attention one's weights in
    SmolLM2, an LM head hundreds of times), buying back less error for the same memory."""
    if metric not in METRICS:
        raise PhikitError(f"unknown error metric {metric!r}: use one of {', '.join(METRICS)}")
    ranked = sorted(errors, key=lambda e: e.score(metric) / max(e.extra_bytes, 1), reverse=True)
    kept, spent = [], 0
    for e in ranked:
        if e.score(metric) > 0 and spent + e.extra_bytes <= budget_bytes:
            kept.append(e.name)
            spent += e.extra_bytes
    return kept


def model_bytes_16bit(model) -> int:
    """Bytes of the model's weights in 16-bit (each parameter once, two bytes a value)."""
    return sum(p.numel() for p in model.parameters()) * 2


def weight_bytes(model) -> int:
    """Bytes the loaded model's weights take: parameters and buffers once each, plus each NF4 layer's
    quantisation state (absmax, nested absmax, code tables), which get_memory_footprint leaves out."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.nbytes
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            n += quant_state_bytes(qs)
    return n


# ---- GPTQ rounding onto the NF4 grid ----

def layer_hessians(model, batches, names: list[str]) -> dict:
    """name -> X^T X (fp32, [K, K], summed over the calibration tokens) of each named layer's input on `model`."""
    import torch

    hs: dict = {}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            if name in hs:
                hs[name].addmm_(x.T, x)
            else:
                hs[name] = x.T @ x
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hs


def gptq_nf4(weight, hessian, damp: float = GPTQ_DAMP, block: int = 128):
    """(codes, absmax): `weight` [N, K] (K a multiple of 64) on bitsandbytes' NF4 grid, block 64 along K,
    rounded by GPTQ (Frantar et al. 2022) instead of to the nearest code.

    Columns are rounded in order; each one's error, scaled by the inverse Hessian of the layer's squared
    output error (`hessian` = X^T X of its calibration inputs, damped by `damp` x its mean diagonal), is taken
    off the columns not rounded yet, so they absorb it. A block's absmax is fixed (bf16, as a load computes it)
    when its first column is reached, from the weights as compensated so far. codes: [N, K] uint8 indices into
    the NF4 table; absmax: [N * K / 64] fp32, before bitsandbytes' double quantisation (see nf4_state).
    Written here because GPTQ implementations (auto-round, gptqmodel) target integer grids and their own
    checkpoint formats, not bitsandbytes' NF4."""
    import torch

    n, k = weight.shape
    if k % 64:
        raise ValueError(f"gptq_nf4 needs the input width to be a multiple of 64 (NF4's block), got {k}")
    dev = weight.device
    code, mids = nf4_table(dev)
    w = weight.detach().to(torch.bfloat16).float()  # what the checkpoint's source holds
    h = hessian.to(dev, torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs the calibration never moved: rounded to nearest (GPTQ zeroes them; a user's
    h[dead, dead] = 1          # text may move them, so they keep their weights)
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty((n, k), dtype=torch.uint8, device=dev)
    absmax = torch.empty((n, k // 64), dtype=torch.float32, device=dev)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.empty((n, i2 - i1), device=dev)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % 64 == 0:
                absmax[:, col // 64] = w1[:, i : i + 64].abs().amax(1).to(torch.bfloat16).float().clamp_min(1e-30)
            a = absmax[:, col // 64]
            c = torch.bucketize(w1[:, i] / a, mids)
            codes[:, col] = c.to(torch.uint8)
            e = (w1[:, i] - code[c] * a) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes, absmax.reshape(-1)


def pack_nf4(codes):
    """NF4 codes (uint8, 0..15) -> bitsandbytes' packed layout: [numel / 2, 1] uint8, the first code of a pair
    in the high nibble."""
    import torch

    flat = codes.reshape(-1)
    return (flat[0::2] << 4 | flat[1::2]).to(torch.uint8).view(-1, 1)


def nf4_state(absmax, shape, dtype):
    """The bitsandbytes QuantState of an NF4 weight of `shape` with fp32 block `absmax`, double quantised as
    bitsandbytes does (the absmax less its mean, 8-bit blockwise over 256): with pack_nf4's codes, what its
    quantize_4bit returns for weights whose nearest codes these are (tested)."""
    import bitsandbytes.functional as F

    offset = absmax.mean()
    q2, s2 = F.quantize_blockwise((absmax - offset).contiguous(), blocksize=256)
    return F.QuantState(absmax=q2, shape=shape, code=F.get_4bit_type("nf4", device=absmax.device), blocksize=64,
                        quant_type="nf4", dtype=dtype, offset=offset, state2=s2)


def round_gptq(model, batches, names: list[str]) -> dict:
    """name -> (packed codes, absmax, output error against nearest rounding) for each named layer of the 16-bit `model`
    whose input width is a multiple of 64, by gptq_nf4 on the calibration `batches`. The Hessians are
    collected in passes of at most HESSIAN_BYTES (one pass for a small model; phi-4's down_proj alone holds
    1.3 GB), each layer's from the 16-bit model's own activations."""
    import torch
    from tqdm.auto import tqdm

    hbytes = {n: model.get_submodule(n).in_features ** 2 * 4 for n in names if model.get_submodule(n).in_features % 64 == 0}
    names = list(hbytes)
    out: dict = {}
    i = 0
    with tqdm(total=len(names), desc="GPTQ rounding onto NF4", unit="layer") as bar:
        while i < len(names):
            chunk, size = [], 0
            while i < len(names) and (not chunk or size + hbytes[names[i]] <= HESSIAN_BYTES):
                size += hbytes[names[i]]
                chunk.append(names[i])
                i += 1
            hs = layer_hessians(model, batches, chunk)
            for n in chunk:
                w = model.get_submodule(n).weight.detach()
                codes, absmax = gptq_nf4(w, hs[n])
                out[n] = (pack_nf4(codes).cpu(), absmax.cpu(), _output_err_ratio(w, codes, absmax, hs.pop(n)))
                bar.update(1)
            del hs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def _output_err_ratio(w, codes, absmax, h) -> float:
    """tr(dW H dW^T) with GPTQ's codes over the same with bitsandbytes' nearest rounding: the calibration output
    error GPTQ keeps, as a share of what plain rounding leaves (both before the double quantisation)."""
    import torch

    code, _ = nf4_table(w.device)
    w = w.to(torch.bfloat16).float()
    n, k = w.shape
    wg = (code[codes.long()].view(n, -1, 64) * absmax.view(n, -1, 1)).view(n, k)
    idx, am = nf4_nearest(w.view(n, -1, 64))
    wn = (code[idx] * am[..., None]).view(n, k)

    def err(q):
        d = q - w
        return float(((d @ h) * d).sum())

    base = err(wn)
    return err(wg) / base if base > 0 else 1.0


def apply_rounding(qmodel, rounded: dict) -> int:
    """Give the NF4 layers of a bitsandbytes-loaded `qmodel` the codes in `rounded` (round_gptq's), in place;
    how many layers took them. The layer stays a bitsandbytes Linear4bit: its packed weight and QuantState are
    replaced, so save_pretrained writes them as any NF4 checkpoint."""
    import bitsandbytes as bnb

    n = 0
    for name, (packed, absmax, _) in rounded.items():
        mod = qmodel.get_submodule(name)
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        old = mod.weight.quant_state
        if old.blocksize != 64 or old.quant_type != "nf4" or not old.nested:
            raise PhikitError(f"{name}: expected NF4 with block 64 and double quantisation, found {old.quant_type} {old.blocksize}")
        dev = mod.weight.device
        packed, state = packed.to(dev), nf4_state(absmax.to(dev), old.shape, old.dtype)
        if packed.shape != mod.weight.shape:
            raise PhikitError(f"{name}: packed NF4 weight {tuple(packed.shape)} against the layer's {tuple(mod.weight.shape)}")
        mod.weight.data = packed
        mod.weight.quant_state = state
        n += 1
    return n


# ---- choosing, saving, loading ----

def calibration_batches(tok, calib: str | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS) -> tuple[list, dict]:
    """(token batches, description for the report) of the calibration text (see calibration_texts)."""
    texts, source = calibration_texts(calib)
    batches = token_batches(tok, texts, calib_tokens)
    return batches, {"source": source, "tokens": sum(b.numel() for b in batches),
                     "sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest()[:16]}


def choose(model, batches, *, budget: float = DEFAULT_BUDGET, metric: str = DEFAULT_METRIC) -> dict:
    """Measure a loaded 16-bit model on calibration `batches` and choose the layers to keep: a report dict (layers
    with their errors, which are kept and why, skip_modules for the config, estimated memory)."""
    _check(budget, metric)
    errors = measure_layers(model, batches)
    r = choose_from(errors, model_bytes_16bit(model), budget, metric)
    r["default_skips"] = default_skips(model)
    return r


def _check(budget: float, metric: str) -> None:
    if not 0 <= budget <= 1:
        raise PhikitError(f"--budget {budget}: give a fraction of the NF4 model's memory between 0 and 1 (e.g. 0.10)")
    if metric not in METRICS:
        raise PhikitError(f"unknown error metric {metric!r}: use one of {', '.join(METRICS)}")


def choose_from(errors: list[LayerError], total16: int, budget: float, metric: str) -> dict:
    """The choice for measured `errors` of a model of `total16` bytes in 16-bit (see choose)."""
    nf4 = total16 - sum(e.extra_bytes for e in errors)
    kept = set(select(errors, budget * nf4, metric))
    ranked = sorted(errors, key=lambda e: e.score(metric) / max(e.extra_bytes, 1), reverse=True)
    rank = {e.name: i + 1 for i, e in enumerate(ranked)}
    by_err = {e.name: i + 1 for i, e in enumerate(sorted(errors, key=lambda e: e.score(metric), reverse=True))}
    layers = []
    for e in errors:
        why = (f"{metric} error {e.score(metric):.3g} is #{by_err[e.name]} of {len(errors)}; #{rank[e.name]} per extra byte "
               f"({e.extra_bytes / 1e6:.3g} MB more in 16-bit)")
        layers.append({**asdict(e), "extra_bytes": e.extra_bytes, "rank_per_byte": rank[e.name], "kept_16bit": e.name in kept,
                       "why": why if e.name in kept else None})
    extra = sum(e.extra_bytes for e in errors if e.name in kept)
    fisher = sum(e.fisher for e in errors)
    return {
        "metric": metric, "budget": budget,
        # The share of the summed per-layer KL estimates that the kept layers carry: what keeping them should close.
        "fisher_share_kept": round(sum(e.fisher for e in errors if e.name in kept) / fisher, 4) if fisher else None,
        "skip_modules": sorted(kept, key=lambda n: rank[n]),
        "memory_estimate": {"bytes_16bit": total16, "bytes_nf4": nf4, "bytes_dynamic": nf4 + extra,
                            "over_nf4": round(extra / nf4, 4) if nf4 else 0.0},
        "layers": layers,
    }


def bnb_config(skip: list[str] | None = None):
    """phikit's NF4 recipe (loading.nf4_config); with `skip`, also transformers' default skips (an explicit list
    replaces them) plus the given layers, in bitsandbytes' own field, llm_int8_skip_modules."""
    from .loading import nf4_config

    cfg = nf4_config()
    if skip is not None:
        cfg.llm_int8_skip_modules = list(skip)
    return cfg


def save_16bit(model, tok, d: Path) -> None:
    """Write a loaded model (a dequantised GGUF included) to `d` as a bf16 Hugging Face directory."""
    import torch

    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None:
        # transformers marks a dequantised GGUF as "quantised with gguf" and refuses to save it; its weights are plain.
        if getattr(model.hf_quantizer.quantization_config, "quant_method", None) != "gguf":
            raise PhikitError("this model is quantised already: load its 16-bit weights to quantise them")
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)


def _source_dir(spec: ModelSpec, model, tok, work: Path) -> str:
    """A Hugging Face directory holding the 16-bit weights: the model's own, or (GGUF) a dequantised bf16 copy in `work`."""
    if not spec.gguf_file:
        from .loading import _source

        return _source(spec)[0]
    d = work / "base-16bit"
    log.info("writing the dequantised GGUF weights as bf16 to %s (transformers quantises HF weights only)", d)
    save_16bit(model, tok, d)
    return str(d)


def quantize_dynamic(model: str, out: str | Path, *, dynamic: bool = True, calib: str | None = None,
                     budget: float = DEFAULT_BUDGET, metric: str = DEFAULT_METRIC, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                     rounding: str | None = None, device: str = "auto") -> dict:
    """Write a pre-quantised NF4 checkpoint of `model` to `out`: with `dynamic`, the worst layers (per extra byte,
    within `budget` x the NF4 model's memory) kept in 16-bit and named in the config's llm_int8_skip_modules.
    `rounding`: "gptq" (the default with `dynamic`) rounds the NF4 layers by gptq_nf4 on the calibration text,
    "nearest" (the default without) as bitsandbytes does at a load.

    Returns the report (also out/phikit-quantize.json). Raises PhikitError when `out` holds files, on bad
    calibration data or budget, and the loading errors of phikit.load."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from .loading import load_hf, resolve_device

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PhikitError(f"{out} already exists and is not empty: choose another --out, or remove it")
    spec = resolve(model)
    if prequantized(spec.path):
        raise PhikitError(f"{spec.path} is saved in 4-bit already: quantise the 16-bit model it came from")
    rounding = rounding or ("gptq" if dynamic else "nearest")
    if rounding not in ROUNDINGS:
        raise PhikitError(f"unknown rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    calibrated = dynamic or rounding == "gptq"
    if calibrated:  # bad settings and calibration files fail before the (slow) model load
        _check(budget, metric)
        calibration_texts(calib)
    dev = resolve_device(device)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        m16, tok, _ = load_hf(spec, quant="none", device=dev)
        report = {"model": spec.name, "source": spec.source, "dynamic": dynamic, "rounding": rounding}
        if calibrated:
            batches, report["calibration"] = calibration_batches(tok, calib, calib_tokens)
        skip = None
        if dynamic:
            report.update(choose(m16, batches, budget=budget, metric=metric))
            skip = report["default_skips"] + report["skip_modules"]
        rounded = {}
        if rounding == "gptq":
            layers = candidate_layers(m16)
            need = GPTQ_TOKENS_PER_INPUT * max((x.in_features for x in layers.values()), default=0)
            if report["calibration"]["tokens"] < need:
                batches, more = calibration_batches(tok, calib, need)
                report["calibration"]["gptq_tokens"] = more["tokens"]  # may fall short of `need`: all the text there is
            rounded = round_gptq(m16, batches, [n for n in layers if n not in (skip or ())])
        report["memory"] = {"bytes_16bit": model_bytes_16bit(m16)}
        src = _source_dir(spec, m16, tok, tmp)
        del m16
        gc.collect()
        q = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(skip), device_map={"": dev}, dtype=torch.bfloat16)
        if rounded:
            # per layer: the calibration output error GPTQ's codes leave, over what nearest rounding leaves
            report["gptq"] = {"layers": apply_rounding(q, rounded),
                              "output_err_vs_nearest": {n: round(r[2], 4) for n, r in rounded.items()}}
            del rounded
        report["memory"]["bytes_quantized"] = weight_bytes(q)
        report["llm_int8_skip_modules"] = q.config.quantization_config.llm_int8_skip_modules
        final = tmp / "model"
        q.save_pretrained(final, safe_serialization=True)
        tok.save_pretrained(final)
        (final / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if out.exists():
            out.rmdir()
        final.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def prequantized(path: str | Path | None) -> dict | None:
    """The quantization_config of a saved bitsandbytes 4-bit checkpoint directory, else None."""
    if not path:
        return None
    f = Path(path) / "config.json"
    try:
        q = json.loads(f.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return None
    if q.get("quant_method") == "bitsandbytes" and (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return q
    return None


def _cache_dir() -> Path:
    return phikit_home() / "cache" / "dynamic4"


def dynamic_skip_modules(spec: ModelSpec, device: str, budget: float = DEFAULT_BUDGET) -> list[str]:
    """The skip list `--quant nf4-dynamic` loads with: the choice made on the shared SQuAD train contexts,
    measured once per model (a 16-bit load and one pass over the calibration text) and cached under
    $PHIKIT_HOME/cache/dynamic4 (default ~/.phikit), keyed by the weights' files, sizes and times."""
    from .loading import _source, load_hf

    src = Path(_source(spec)[0])
    stamp = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in src.glob("*.safetensors")) if src.is_dir() else []
    key = hashlib.sha256(json.dumps([str(src.resolve()) if src.exists() else str(src), stamp, budget,
                                     DEFAULT_CALIB_TOKENS, DEFAULT_METRIC]).encode()).hexdigest()[:20]
    f = _cache_dir() / f"{key}.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())["skip"]
        except (json.JSONDecodeError, KeyError):
            pass
    log.warning("--quant nf4-dynamic: measuring %s's layers once on the SQuAD contexts (cached for later loads)", spec.name)
    m16, tok, _ = load_hf(spec, quant="none", device=device)
    batches, calibration = calibration_batches(tok)
    r = {**choose(m16, batches, budget=budget), "calibration": calibration}  # the default metric and calibration text
    del m16
    skip = r["default_skips"] + r["skip_modules"]
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"model": spec.name, "source": str(src), "skip": skip, "report": r}, indent=1))
    tmp.replace(f)
    return skip
