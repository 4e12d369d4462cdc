"""bitsandbytes' 8-bit AdamW without its device-wide synchronise after each tensor, which empties the GPU's
queue at every step's end."""

from __future__ import annotations

import functools

import torch


def adamw8bit(params, **kwargs):
    """bitsandbytes' AdamW8bit, less its device-wide synchronise after each tensor's update.

    Its step calls torch.cuda.synchronize() once per parameter (bitsandbytes.utils.sync_gpu), which its paged
    states need. Unpaged, every kernel is ordered on the current stream, and the synchronise only empties the
    GPU's queue: the next step's first layers then wait on the host's launches. The step is bitsandbytes' own
    loop otherwise; paged optimizers keep bitsandbytes' step."""
    return _adamw8bit_class()(params, **kwargs)


@functools.cache
def _adamw8bit_class() -> type:
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit
