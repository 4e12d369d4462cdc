"""bitsandbytes' NF4 dequantisation in torch ops inside a compiled layer. Why: each bitsandbytes call is a
Python custom op with ~60-80 us of host work, ~600 a Phi-4-mini step, enough to leave the GPU waiting; as
torch ops the dequantisation compiles into the layer's graph at no host cost. There, projections that read
the same input (a Llama layout's q/k/v and gate/up) also share one product (`fuse`)."""

from __future__ import annotations

import functools

import torch

from .fp8 import fp8_linear, weight_scales


def _nf4_weight(packed, absmax_q, absmax2, code2, offset, code, blocksize: int, blocksize2: int, shape, dtype):
    """bitsandbytes' NF4 dequantisation with double-quantised absmax (dequantize_4bit), in torch ops:
    absmax = code2[absmax_q] * absmax2[block of 256] + offset; w = code[nibble] * absmax[block of 64],
    the high nibble of each byte first, computed in fp32 and rounded once to `dtype`. The same operations in
    the same order as bitsandbytes' (the offset added per element either way)."""
    n_blocks = absmax_q.numel()
    a = torch.nn.functional.pad(code2[absmax_q.long()], (0, -n_blocks % blocksize2))
    # `offset`: one number, or one per absmax2 entry (a sibling group's, fuse_siblings: each part its own)
    absmax = (a.view(-1, blocksize2) * absmax2[:, None] + offset.reshape(-1, 1)).view(-1)[:n_blocks]
    b = packed.reshape(-1)
    nibbles = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)
    return (code[nibbles.long()].view(n_blocks, blocksize) * absmax[:, None]).to(dtype).view(shape)


# Projections that read one input, in the order a decoder layer calls them (transformers' Llama, Mistral, Qwen2
# attention and MLP call q, k, v and then gate, up on the same tensor).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def compile_nf4(module: torch.nn.Module, fp8: bool = False, fuse: bool = True) -> int:
    """Inside torch.compile, run `module`'s bitsandbytes NF4 linear layers (double-quantised, as phikit loads
    them) through `_nf4_weight` (in place; returns how many). Outside a compile they run as before.
    `fp8`: their products run in FP8 there (fp8.py). `fuse` (not with fp8): SIBLINGS share one product there
    (`fuse_siblings`).

    Why: each bitsandbytes call is a Python custom op with ~60-80 µs of host work; Phi-4-mini's QLoRA step
    makes ~600 of them, enough to leave the GPU waiting. As torch ops the dequantisation compiles into the
    layer's graph (one fused kernel per weight) at no host cost. Same arithmetic: tests compare the two.
    The layers change class (a subclass of bitsandbytes' Linear4bit), not per-instance forwards, so every
    layer still shares one compiled graph; the quantisation state's tensors become non-persistent buffers
    (the same tensors, so no memory), which torch.compile takes as graph inputs.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for m in module.modules():
        st = getattr(getattr(m, "weight", None), "quant_state", None)
        if type(m) is not Linear4bit or st is None or not st.nested or st.quant_type != "nf4":
            continue
        for name, t in (("packed", m.weight.data), ("absmax_q", st.absmax), ("absmax2", st.state2.absmax),
                        ("code2", st.state2.code), ("offset", st.offset), ("code", st.code)):
            m.register_buffer(f"nf4_{name}", t, persistent=False)
        m.nf4_meta = (st.blocksize, st.state2.blocksize, tuple(st.shape), st.dtype)
        m.nf4_fp8 = fp8
        if fp8:  # the weight's FP8 scales, from the weight this path dequantises: computed once, as it never changes
            w = _nf4_weight(m.weight.data, st.absmax, st.state2.absmax, st.state2.code, st.offset, st.code, *m.nf4_meta)
            for name, t in zip(("rows", "cols"), weight_scales(w)):
                m.register_buffer(f"fp8_{name}", t, persistent=False)
            del w
        m.__class__ = _nf4_class(Linear4bit)
        n += 1
    if fuse and not fp8:
        fuse_siblings(module)
    return n


def fuse_siblings(module: torch.nn.Module) -> int:
    """Inside torch.compile, each group of SIBLINGS in `module` that are compiled NF4 layers (or peft LoRA layers
    over them) alike runs one product: the first dequantises the group's weights into one matrix, multiplies
    the input once and returns its own columns; each sibling, called next on the same tensor, takes its
    columns from there (on any other input it multiplies its own weight, as before). Returns how many groups.

    Why: a Llama layout (phikit convert --to llama, train --llamafy) splits Phi's fused qkv_proj and
    gate_up_proj, so each LoRA pair learns its own part; the base's product need not split with them. Split,
    phi-4's k and v products are 1,280 columns wide, too narrow to fill an H100 (the layout trained 2.5% slower
    than the fused one, docs/train.md); one product over the group is the fused layout's. The weight kept for
    the backward is the group's one matrix, the same bytes as the parts'.

    The group's NF4 codes are moved into one set of buffers (`nf4_group_*` on the first part; each part's own
    weight and quantisation state become views of it, so no memory is added) and dequantised in one pass,
    straight into the group's matrix: concatenating the parts' dequantised matrices instead made the converted
    phi-4 13% slower on the H100 (session 35). Exact where every part but the last holds whole absmax2 blocks
    (256 NF4 blocks of 64: every Phi shape); a group that does not is left split.
    The siblings pass their columns through an attribute (`nf4_pending`, cleared when read), which
    torch.compile traces as a side effect within the layer's graph: the layer's forward is not rewritten.
    Where the parts are peft LoRA layers, the first of those gets `lora_group` (its siblings `lora_pending`):
    fast_lora then adds the group's LoRA products to the group's output in one product as well."""
    groups = 0
    for parent in module.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, name, None) for name in names]
            parts = [_base(m) for m in layers]
            if not all(isinstance(m, _nf4_class(_linear4bit())) and not m.nf4_fp8 for m in parts):
                continue
            if len({(m.nf4_meta[0], m.nf4_meta[1], m.nf4_meta[3], m.compute_dtype, m.in_features, m.bias is None)
                    for m in parts}) != 1:
                continue  # fused only where one matrix holds them all
            if any(m.nf4_absmax_q.numel() % m.nf4_meta[1] for m in parts[:-1]) or not all(
                    torch.equal(m.nf4_code, parts[0].nf4_code) and torch.equal(m.nf4_code2, parts[0].nf4_code2) for m in parts):
                continue  # their blocks would not line up in one set of codes
            _share_codes(parts)
            parts[0].nf4_group = tuple(parts[1:])
            for m in parts[1:]:
                m.nf4_pending = None
            if all(m is not p for m, p in zip(layers, parts)):  # peft LoRA layers over them: one LoRA product too
                layers[0].lora_group = tuple(layers[1:])
                for m in layers[1:]:
                    m.lora_pending = None
            groups += 1
    return groups


def _share_codes(parts) -> None:
    """Move `parts`' packed weights, absmax codes and absmax2 into one buffer each, registered on the first
    part as nf4_group_* (with one offset per absmax2 entry), and make every part's own tensors (its weight,
    its quantisation state and its nf4_* buffers) views of them."""
    def joined(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        whole = torch.cat([getattr(m, f"nf4_{name}").reshape(-1) for m in parts])
        views, at = [], 0
        for m in parts:
            t = getattr(m, f"nf4_{name}")
            views.append(whole[at : at + t.numel()].view(t.shape))
            at += t.numel()
        return whole, views

    first = parts[0]
    for name in ("packed", "absmax_q", "absmax2"):
        whole, views = joined(name)
        first.register_buffer(f"nf4_group_{name}", whole, persistent=False)
        for m, v in zip(parts, views):
            st = m.weight.quant_state
            if name == "packed":
                m.weight.data = v
            elif name == "absmax_q":
                st.absmax = v
            else:
                st.state2.absmax = v
            m.register_buffer(f"nf4_{name}", v, persistent=False)
    offsets = torch.cat([m.nf4_offset.reshape(1).expand(m.nf4_absmax2.numel()) for m in parts])
    first.register_buffer("nf4_group_offset", offsets, persistent=False)
    first.nf4_group_meta = (*first.nf4_meta[:2], (sum(m.out_features for m in parts), first.in_features), first.nf4_meta[3])


def _base(m):
    """The linear layer under a peft LoRA layer, or `m`."""
    return getattr(m, "base_layer", m)


def _linear4bit() -> type:
    from bitsandbytes.nn import Linear4bit

    return Linear4bit


@functools.cache
def _nf4_class(base: type) -> type:
    class CompiledNF4Linear(base):
        def forward(self, x):
            if not torch.compiler.is_compiling():
                return super().forward(x)
            x_in, dtype = x, x.dtype
            x = x.to(self.compute_dtype or dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            pending, group = getattr(self, "nf4_pending", None), getattr(self, "nf4_group", ())
            if pending is not None:  # a sibling multiplied this input already (fuse_siblings)
                self.nf4_pending = None
                if pending[0] is x_in:
                    return pending[1]
            # The partitioner keeps W in bf16 from the recompute for the backward, which follows it at once:
            # one dequantisation per weight fewer a step (phi-4 on the H100: 10 ms of 384, for 0.43 GiB more at
            # the peak; Phi-4-mini: 0.14 GiB). bitsandbytes' MatMul4Bit dequantises again instead, and so did
            # this path, checkpointed, while the peaks were above the targets.
            if self.nf4_fp8:
                return fp8_linear(x, self.nf4_dequantised(), bias, (self.fp8_rows, self.fp8_cols)).to(dtype)
            if not group:
                return torch.nn.functional.linear(x, self.nf4_dequantised().to(x.dtype), bias).to(dtype)
            mine, *theirs = self.group_product(x_in).split([self.out_features] + [m.out_features for m in group], dim=-1)
            for m, cols in zip(group, theirs):
                m.nf4_pending = (x_in, cols)
            return mine

        def group_product(self, x):
            """The whole group's output for `x` (its parts' columns side by side), in x's dtype: one product
            over the group's one matrix, dequantised in one pass from its shared codes (fuse_siblings). Inside
            torch.compile only; fast_lora's LoRA groups add their own columns before splitting it."""
            dtype, group = x.dtype, self.nf4_group
            x = x.to(self.compute_dtype or dtype)
            w = _nf4_weight(self.nf4_group_packed, self.nf4_group_absmax_q, self.nf4_group_absmax2, self.nf4_code2,
                            self.nf4_group_offset, self.nf4_code, *self.nf4_group_meta)
            bias = None if self.bias is None else torch.cat([self.bias] + [m.bias for m in group]).to(x.dtype)
            return torch.nn.functional.linear(x, w.to(x.dtype), bias).to(dtype)

        def nf4_dequantised(self):
            return _nf4_weight(self.nf4_packed, self.nf4_absmax_q, self.nf4_absmax2, self.nf4_code2, self.nf4_offset,
                               self.nf4_code, *self.nf4_meta)

    return CompiledNF4Linear
