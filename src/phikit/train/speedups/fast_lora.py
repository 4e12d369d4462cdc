"""peft's LoRA layers on a plain forward: base(x) + B(A(dropout(x)) * scaling), the scaling on the rank-r
product and the dropout hashed (hashed_dropout.py). Why: in a compiled layer, peft's `* scaling` on the full
output (even by 1.0) makes the backward write a scaled copy of each output gradient, and torch's dropout
keeps its outputs and masks for the backward."""

from __future__ import annotations

import functools

import torch

from .hashed_dropout import DropoutSeed, hash_dropout


def fast_lora(module: torch.nn.Module, seed: DropoutSeed | None = None) -> int:
    """peft's LoRA linear layers in `module` run the plain LoRA forward below (in place; returns how many).
    `seed`: the DropoutSeed their dropout hashes (each layer its own site), which the caller redraws before
    each forward; without it (or while it is `chunked`) each call draws its own.

    result = base(x) + B(A(dropout(x)) * scaling): the scaling multiplies the rank-r product, where peft
    multiplies the full output, and the dropout is `hash_dropout`. Same function; two costs gone in a compiled
    layer. peft's `* scaling` (even by 1.0) makes the backward write a scaled copy of each output gradient (at
    phi-4's gate/up projection, 140 MB at the step's peak), and torch's dropout keeps its outputs and masks.
    Anything but that plain case (merged or disabled adapters, DoRA and other variants, a LoRA bias, mixed
    adapter batches) runs peft's own forward. The class changes, as in compile_nf4, so one compiled graph
    still serves every layer; the dropout masks differ from peft's (another generator), so the stock path's
    masks are not reproduced once this is applied.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    n = site = 0
    for m in module.modules():
        if not (isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)):
            continue
        if not getattr(type(m), "_phikit_fast_lora", False):
            m.__class__ = _fast_lora_class(type(m))
            n += 1
        if seed is not None:  # the same tensor in every layer, as a buffer so torch.compile takes it as an input
            m.register_buffer("phikit_seed", seed.tensor, persistent=False)
            m.phikit_dropout, m.phikit_site = seed, site
            site += 1
    return n


@functools.cache
def _fast_lora_class(base: type) -> type:
    class FastLora(base):
        _phikit_fast_lora = True

        def _plain(self) -> bool:
            variants, dora = getattr(self, "lora_variant", {}), getattr(self, "use_dora", {})
            return not (self.disable_adapters or self.merged) and all(
                a not in variants and not dora.get(a) and self.lora_B[a].bias is None
                for a in self.active_adapters if a in self.lora_A)

        def forward(self, x, *args, **kwargs):
            pending = getattr(self, "lora_pending", None)
            if pending is not None:  # the group's first layer computed this input's columns (_group_forward)
                self.lora_pending = None
                if pending[0] is x and not (args or kwargs):
                    return pending[1]
            if args or kwargs or not self._plain():
                return super().forward(x, *args, **kwargs)
            group = getattr(self, "lora_group", ())
            if group and torch.compiler.is_compiling() and self._groupable(group):
                return self._group_forward(x, group)
            result = self.base_layer(x)
            for a in self.active_adapters:
                if a not in self.lora_A:
                    continue
                h = self._lora_input(x, a)
                result = result + self.lora_B[a](self.lora_A[a](h) * self.scaling[a]).to(result.dtype)
            return result

        def _lora_input(self, x, a):
            """x as adapter `a`'s A reads it: in A's dtype without autocast (as peft), through its dropout."""
            h = x if torch.is_autocast_enabled() else x.to(self.lora_A[a].weight.dtype)
            if p := self._dropout_rate(a):
                scope = getattr(self, "phikit_dropout", None)
                seed = None if scope is None or scope.per_call else self.phikit_seed
                h = hash_dropout(h, p, seed, getattr(self, "phikit_site", 0), scope)
            return h

        def _groupable(self, group) -> bool:
            """The group's LoRA fits one product: each layer plain, one active adapter alike, one scaling, one
            dropout (a rank may differ: B is block-diagonal)."""
            a = self.active_adapters
            if len(a) != 1 or not all(getattr(type(m), "_phikit_fast_lora", False) and m._plain() for m in group):
                return False
            a = a[0]
            return all(m.active_adapters == [a] and a in m.lora_A and m.scaling[a] == self.scaling[a]
                       and m.lora_A[a].weight.dtype == self.lora_A[a].weight.dtype
                       and m._dropout_rate(a) == self._dropout_rate(a) for m in group)

        def _dropout_rate(self, a) -> float:
            drop = self.lora_dropout[a]
            return drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0

        def _group_forward(self, x, group):
            """The LoRA group's output for `x` in one pass: the base group's one product (nf4.fuse_siblings)
            plus one LoRA product, A stacked and B block-diagonal, then split; each sibling, called next on
            the same tensor, returns its columns. Why: a Llama layout's seven LoRA pairs a layer cost the
            host ~45% more launches than the fused layout's four (phi-4 on the H100, session 38: the GPU
            work within 1%, the step 2.8% slower); as one product per group the launches are the fused
            layout's, while each projection keeps its own A and B. The block-diagonal B multiplies zeros,
            rank x columns a token: under 1% of the base product's work at Phi's ranks and widths.
            With dropout the group draws one mask (this layer's), as the fused layout's one qkv_proj and
            gate_up_proj do; split, each projection draws its own."""
            a = self.active_adapters[0]
            layers = (self, *group)
            h = self._lora_input(x, a)
            A = torch.cat([m.lora_A[a].weight for m in layers])
            B = torch.block_diag(*(m.lora_B[a].weight for m in layers))
            lora = torch.nn.functional.linear(torch.nn.functional.linear(h, A) * self.scaling[a], B)
            y = self.base_layer.group_product(x)
            y = y + lora.to(y.dtype)
            mine, *theirs = y.split([m.out_features for m in layers], dim=-1)
            for m, cols in zip(group, theirs):
                m.lora_pending = (x, cols)
            return mine

    FastLora.__name__ = FastLora.__qualname__ = f"FastLora{base.__name__}"
    return FastLora
