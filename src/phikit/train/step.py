"""One optimizer step, apart from the setup around it: the loss, the micro-batches of a global
batch accumulated (DDP's no_sync on all but the last), the gradient clipped, the optimizer and
the schedule stepped, the gradients zeroed in place; and the loss read on the host one step late.

The training loop (loop.py) calls `Step` once per optimizer step and `Readback` for its log;
benchmarks/speed/train_speed.py times the same `Step`, so what it measures is what `phikit train` runs.
Nothing here knows which speed-ups are on: they are in the model, the parameters, the optimizer
and the `head_ce` given to `lm_loss` (see speedups/).
"""

from __future__ import annotations

import contextlib
from typing import Callable

from .data import IGNORE
from .distributed import Dist


def lm_loss(model, ids, att, lab, autocast, head_ce: Callable | None = None):
    """Summed cross-entropy over label positions.

    The LM head runs only on the positions that carry a label (the answer
    tokens): with a 49k-200k vocabulary that head is a fifth or more of a small
    model's compute, and the prompt's logits would be thrown away anyway. With
    `head_ce` (speedups.chunked_ce: the head and the cross-entropy in chunks, the
    gradient taken on the way) a frozen bias-free head (LoRA's case) never
    makes its logits whole.

    `lab` may stay in CPU memory while the model runs on the GPU (the loop's
    case): the label positions are then found on the host. Found on the GPU, the
    number of positions is a value the host must wait for, which would drain the
    GPU's queue of work in the middle of every step.
    """
    import torch.nn.functional as F
    from torch import nn

    base = model.get_base_model()
    with autocast():
        hidden = base.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        target = lab[:, 1:]
        keep = target != IGNORE
        if lab.device == hidden.device:
            h, target = hidden[:, :-1][keep], target[keep]
        else:
            b, t = keep.nonzero(as_tuple=True)
            rows, target = to_device(hidden.device, b * lab.shape[1] + t, target[keep])
            h = hidden.flatten(0, 1).index_select(0, rows)
        head = base.get_output_embeddings()
        if head_ce is not None and type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
            return head_ce(h, head.weight, target)
        logits = head(h)
    return F.cross_entropy(logits.float(), target, reduction="sum")


def to_device(device, *tensors):
    """`tensors` on `device`; to a GPU from pinned memory, so the copies queue behind the GPU's work instead
    of waiting for it (torch's blocking copy synchronises the stream)."""
    import torch

    if torch.device(device).type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def on_device(device, ids, att, lab, labels: bool):
    """A batch for the loss: ids and mask on `device`; the labels too where `labels` (the loss runs inside a
    DDP / FSDP wrapper, which takes device tensors), else left on the host, for lm_loss."""
    ids, att = to_device(device, ids, att)
    if labels:
        (lab,) = to_device(device, lab)
    return ids, att, lab


def count_labels(items) -> int:
    """Positions with a label to predict in tokenised items (ids, labels): the loss's denominator."""
    return sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in items)


def _no_phase(name: str):
    return contextlib.nullcontext()


class Step:
    """One optimizer step over a global batch.

    `fwd(ids, att, lab)` is the summed loss (Dist.wrap of lm_loss); `params` what the optimizer steps and
    the clipping measures. Call it with this rank's micro-batches, each (ids, att, labels, real) as
    collated on the host, and the label count of the whole global batch: the loss is its per-token mean.
    A micro-batch with real=False (a rank without data in a short last step) runs at weight 0, so the
    rank still joins the gradient all-reduce. Returns the step's loss on the device (None if no micro-batch
    was real): reading it is Readback's job, one step later.
    """

    def __init__(self, fwd, params, optimizer, scheduler=None, *, device: str = "cpu", dist: Dist | None = None,
                 max_grad_norm: float | None = 1.0):
        self.fwd, self.params, self.optimizer, self.scheduler = fwd, params, optimizer, scheduler
        self.device, self.dist, self.max_grad_norm = device, dist or Dist(), max_grad_norm

    def __call__(self, micro_batches: list[tuple], n_labels: int, phase=_no_phase):
        """`phase(name)`: a context manager around each phase (forward, backward, optimizer), for the benchmark's
        profiler annotations and per-phase timings; nothing by default."""
        import torch

        dist, loss_sum = self.dist, None
        for k, (ids, att, lab, real) in enumerate(micro_batches):
            with dist.no_sync(self.fwd, accumulate=k < len(micro_batches) - 1):
                with phase("phase:forward"):
                    ids, att, lab = on_device(self.device, ids, att, lab, labels=dist.ddp)  # DDP / FSDP wrap the loss
                    loss = self.fwd(ids, att, lab) / max(n_labels, 1)
                with phase("phase:backward"):
                    dist.backward(loss, has_data=real)
            if real:
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        with phase("phase:optimizer"):
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)  # in place: speedups.flat_params' views must keep their buffer
        return loss_sum


class Readback:
    """Each step's loss, read on the host one step late.

    float(loss) at the step's end waits for the GPU to finish the step, and the next step then starts
    on an idle GPU whose first layers wait for the host's launches. Here the loss is copied to pinned
    memory behind the step's work, and waited for only once the next step has been queued.
    """

    def __init__(self):
        self.queue: list = []

    def push(self, loss, **fields) -> None:
        import torch

        done = None
        if loss is not None and loss.is_cuda:
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            loss = host
        self.queue.append((loss, done, fields))

    def ready(self):
        """(loss, fields) of each queued step, oldest first (waiting for each)."""
        while self.queue:
            loss, done, fields = self.queue.pop(0)
            if done is not None:
                done.synchronize()
            yield (0.0 if loss is None else float(loss)), fields
