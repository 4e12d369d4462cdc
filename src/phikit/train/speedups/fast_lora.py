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
            if args or kwargs or not self._plain():
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            for a in self.active_adapters:
                if a not in self.lora_A:
                    continue
                lora_A, lora_B, drop = self.lora_A[a], self.lora_B[a], self.lora_dropout[a]
                h = x if torch.is_autocast_enabled() else x.to(lora_A.weight.dtype)  # as peft: its dtype without autocast
                if isinstance(drop, torch.nn.Dropout) and drop.training:
                    scope = getattr(self, "phikit_dropout", None)
                    seed = None if scope is None or scope.per_call else self.phikit_seed
                    h = hash_dropout(h, drop.p, seed, getattr(self, "phikit_site", 0), scope)
                result = result + lora_B(lora_A(h) * self.scaling[a]).to(result.dtype)
            return result

    FastLora.__name__ = FastLora.__qualname__ = f"FastLora{base.__name__}"
    return FastLora
