"""Data-parallel training through torch's own engine (torch.distributed + DDP or FSDP2).

Under `torchrun` / `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK in the
environment) every process runs the same `train()`; this module is the only
place that knows there are several:

- the process group: nccl on CUDA, gloo on the CPU (what CI runs: 2 gloo processes);
- one device per local rank;
- the model wrapped in DDP around a small module whose forward computes phikit's
  loss, so DDP's own hooks all-reduce the LoRA gradients (the loss calls the
  decoder and the LM head directly, which would bypass a wrapped PeftModel);
- sharding: each optimizer step takes `grad_accum x world` micro-batches from the
  one seeded, length-grouped order and rank r trains on every world-th of them, so
  the global batch and its order do not depend on the number of processes;
- sums across ranks for the logged loss, token counts and eval loss;
- rank 0 alone writes; every rank's RNG state goes into the checkpoint.

`strategy="fsdp"` shards the model instead of copying it: torch's FSDP2 (`fully_shard`) on every
decoder layer, then on the loss module as the root, so each process holds 1/N of every weight and
gathers a layer's weights only while it runs. Its gradients are reduce-scattered (averaged, as DDP),
so the loss scaling, sharding and logging are those of DDP; what differs: every rank must run as many
forward passes as the others (each one gathers weights: a collective), and state dicts are gathered
in full (`full_state_dict`) before rank 0 writes them. 16-bit weights only (see `check_strategy`).

The `--gpus N` launcher that starts those processes through torchrun is launch.py.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import PhikitError


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a torchrun / accelerate environment, None when not launched so."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str, quant: str) -> None:
    """Refuse what FSDP cannot do here, before the model load."""
    if strategy not in STRATEGIES:
        raise PhikitError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and quant in ("nf4", "nf4-dynamic"):
        # fully_shard turns every parameter into a DTensor shard; bitsandbytes' NF4 weights (Params4bit, with
        # their quantisation state beside the packed bytes) are not split and gathered that way. QLoRA under
        # FSDP1 with bnb_4bit_quant_storage (answer.ai's recipe) exists, but needs a GPU to build and check.
        raise PhikitError("--strategy fsdp shards 16-bit weights only: NF4 (QLoRA) weights are not sharded by torch FSDP2 "
                          "(fully_shard), which phikit uses. Use --quant none with fsdp, or --strategy ddp for QLoRA "
                          "(each process then holds its own NF4 copy)")


class Dist:
    """The run's place among its processes. `Dist()` is a plain single process: every method is then the
    identity or a no-op, so such a run takes exactly the code path (and arithmetic) it always had.
    Under torchrun even a world of 1 goes through DDP (or FSDP) and the collectives (`ddp`): one GPU can check that path."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, ddp: bool = False, strategy: str = "ddp"):
        self.rank, self.world, self.local_rank, self.ddp, self.strategy = rank, world, local_rank, ddp, strategy

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """Sharded (FSDP2) rather than replicated (DDP): only ever in a launched run."""
        return self.ddp and self.strategy == "fsdp"

    @classmethod
    def from_env(cls, device: str, strategy: str = "ddp") -> tuple["Dist", str]:
        """Join the process group the environment describes (if any); returns (Dist, this rank's device).
        `strategy` (ddp | fsdp) applies to launched runs; a plain single process has nothing to shard."""
        place = env_world()
        if place is None:
            return cls(), device
        import atexit

        import torch
        import torch.distributed as td

        rank, world, local = place
        if device.startswith("cuda"):
            if local >= torch.cuda.device_count():
                raise PhikitError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible; launch at most that many processes per node")
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        if not td.is_initialized():
            td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            atexit.register(td.destroy_process_group)
        return cls(rank, world, local, ddp=True, strategy=strategy), device

    # --- data -------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's part of a list of micro-batches: every world-th one from its rank on."""
        return items if self.world == 1 else items[self.rank :: self.world]

    def micro_batches(self, group: list) -> list[tuple]:
        """(micro-batch, real) pairs this rank runs for one step. A rank with no data runs the group's first
        at weight 0 (real=False) so it still joins the gradient all-reduce. Under FSDP every forward
        gathers weights, so every rank pads with such passes to as many as the busiest rank runs."""
        mine = [(c, True) for c in self.shard(group)]
        if not self.fsdp:
            return mine or [(group[0], False)]
        return mine + [(group[0], False)] * (-(-len(group) // self.world) - len(mine))

    def all_sum(self, *values: float) -> tuple:
        """Sums over ranks (float64 on the CPU for gloo, the device's for nccl); the values themselves on one process."""
        if not self.ddp:
            return values
        import torch
        import torch.distributed as td

        dev = f"cuda:{self.local_rank}" if td.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        td.all_reduce(t)
        return tuple(type(v)(x) for v, x in zip(values, t.tolist()))

    # --- model ------------------------------------------------------------------
    def wrap(self, model, loss_fn, autocast):
        """A callable (ids, att, lab) -> summed loss; under DDP / FSDP the loss is computed inside the wrapper's
        forward. FSDP replaces the model's parameters by shards: wrap before an optimizer takes them."""
        if not self.ddp:
            return lambda ids, att, lab: loss_fn(model, ids, att, lab, autocast)
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        class LossModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, ids, att, lab):
                return loss_fn(self.model, ids, att, lab, autocast)

        mod = LossModule()
        if self.fsdp:
            return _fully_shard(mod, model)
        # The frozen base weights were read from the same files on every rank: DDP's start-up broadcast of
        # them would only copy them again (28 GB for phi-4 in bf16). Only the LoRA weights are synced.
        frozen = [n for n, p in mod.named_parameters() if not p.requires_grad] + [n for n, _ in mod.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(mod, frozen)
        dev = [self.local_rank] if next(model.parameters()).is_cuda else None
        # find_unused_parameters=False: every LoRA layer runs in every forward (all linear projections
        # of every block), so DDP need not walk the graph each step. The buffers (rotary tables) are
        # constants, ignored above, so DDP syncs none of them.
        return DDP(mod, device_ids=dev, find_unused_parameters=False)

    def no_sync(self, fwd, accumulate: bool):
        """DDP's no_sync() (FSDP2: no gradient reduce-scatter) for every micro-batch but a rank's last of the
        step: one all-reduce per step."""
        if self.fsdp:
            return _fsdp_sync(fwd, not accumulate)
        return fwd.no_sync() if accumulate and self.ddp else contextlib.nullcontext()

    def backward(self, loss, has_data: bool = True) -> None:
        """Backward of this rank's part of the step's loss. DDP averages gradients over ranks while the
        loss is already normalised by the label count of the whole global batch, so it is scaled by
        the world size to make the average the single-process sum. A rank left without data in an
        epoch's last, short step still takes part in the all-reduce, at weight 0."""
        if not self.ddp:
            loss.backward()
        else:
            (loss * (self.world if has_data else 0)).backward()

    # --- files ------------------------------------------------------------------
    def trainable_state(self, model, optimizer) -> tuple[dict, dict]:
        """(trainable weights, optimizer state) of an FSDP-sharded model, gathered in full to rank 0's CPU
        (the other ranks get empty dicts), keyed by parameter name. A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        # ignore_frozen_params: the LoRA weights only; the frozen base is never gathered (28 GB for phi-4 in bf16).
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return weights, get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_trainable_state(self, model, optimizer, weights: dict, optim: dict) -> None:
        """Put full state dicts saved by `trainable_state` back into the sharded model and its optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))  # frozen weights: not saved
        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if self.ddp:
            import torch.distributed as td

            td.barrier()

    def rng_states(self) -> list | None:
        """Every rank's RNG state (rank order), gathered on all ranks; None on one process."""
        if not self.ddp:
            return None
        import torch.distributed as td

        from .checkpoint import rng_state

        states: list = [None] * self.world
        td.all_gather_object(states, rng_state())
        return states


def decoder_layers(model):
    """The list of decoder layers of a transformers causal LM (its base model's `layers`, as
    `model.model.layers` for Phi and Llama), or None."""
    import torch

    layers = getattr(getattr(model, "base_model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _fully_shard(root, model):
    """FSDP2 over the loss module: each decoder layer (the model's `_no_split_modules`, as accelerate picks
    them) is its own unit, gathered only while it runs; the root holds the rest (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model()
    kinds = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in kinds] or list(decoder_layers(base) or [])
    # No MixedPrecisionPolicy: the weights keep their dtypes (16-bit frozen base, fp32 LoRA, as peft makes
    # them) and compute as in a single-process run, under the same autocast. FSDP2 gathers mixed dtypes
    # in one unit (tried: bf16 base + fp32 LoRA on 2 gloo processes).
    for layer in layers:
        fully_shard(layer)
    return fully_shard(root)


@contextlib.contextmanager
def _fsdp_sync(root, sync: bool):
    root.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)
