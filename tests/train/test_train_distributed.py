"""Data-parallel training (torch DDP, and FSDP2) on the CPU: 2 gloo processes through torchrun against
1 process with the same global batch, on a tiny random model.

Tolerances: the two runs add the same fp32 numbers in different orders (1 process accumulates the
4 micro-batches' gradients one after another; 2 processes accumulate 2 each, then all-reduce and
average), so gradients differ in the last bits. Adam divides each gradient by its own running
magnitude: where a gradient is a near-cancelling sum, that rounding is large relative to it and
the update moves with it. Measured: 3.9e-6 at most over these 4 steps at lr 1e-2 (DDP and FSDP alike). Adapter weights
must agree within 5e-5 (0.5% of one step's size, lr; a gradient not averaged over both processes
moves them by ~lr). The logged losses are rounded to 5 decimals: within 2e-5.
LoRA dropout is 0 here: otherwise each process would draw its own masks and the runs could not match.

FSDP gets the same tolerances, for the same reason: its forward computes with the very weights (gathered
whole from the shards, bit for bit), each rank's gradients are summed over its micro-batches as under
DDP, and the reduce-scatter averages them over the processes as DDP's all-reduce does; only the order
of the fp32 additions differs from one process. Gradient clipping sums the squared norms of the shards.
"""

import json

import pytest

from phikit.errors import PhikitError
from phikit.train import make_config, train
from phikit.train.distributed import Dist
from phikit.train.launch import launch

from test_train import FACTS

SETTINGS = dict(device="cpu", max_seq=96, micro_batch=2, lr=1e-2, max_steps=4, save_every=2, val_split=0.1,
                lora_dropout=0.0, progress=False)


def _records(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_shards_cover_the_global_batch_once():
    group = [[1, 2], [3, 4], [5, 6], [7]]
    parts = [Dist(r, 2).shard(group) for r in range(2)]
    assert parts == [[[1, 2], [5, 6]], [[3, 4], [7]]]
    assert Dist().shard(group) is group  # one process: untouched
    assert [Dist(r, 3).shard(group[:1]) for r in range(3)] == [[[1, 2]], [], []]  # short last step: ranks 1, 2 idle


@pytest.fixture(scope="module")
def one_process(tiny_dirs, tmp_path_factory):
    """(settings, output dir) of the one-process reference run: global batch 8 = micro 2 x accum 4."""
    import torch

    root = tmp_path_factory.mktemp("dist")
    data = root / "facts.jsonl"
    # 14 examples: 13 train = 7 micro-batches, so each epoch's second step has 3: one rank runs 2, the other 1
    # (under FSDP it pads with a pass at weight 0); 1 validation example: one rank scores it, the other none.
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in (FACTS * 2)[:14]))
    common = dict(SETTINGS, data=str(data), model=str(tiny_dirs["chatml"]))
    one = root / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs; several threads on a busy shared CPU crawl
    try:
        train(make_config(**common, out=str(one), grad_accum=4))
    finally:
        torch.set_num_threads(threads)
    return common, one


def _assert_same_run(one, two):
    """Per-step losses, eval losses and adapter weights of `two` (2 processes) match `one` (see the tolerances above)."""
    from safetensors.torch import load_file

    la = {r["step"]: r["loss"] for r in _records(one) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in _records(two) if "loss" in r}
    assert list(la) == list(lb) == [1, 2, 3, 4]
    assert list(lb.values()) == pytest.approx(list(la.values()), abs=2e-5)
    ea = [r["eval_loss"] for r in _records(one) if "eval_loss" in r and "event" not in r]  # one per epoch
    eb = [r["eval_loss"] for r in _records(two) if "eval_loss" in r and "event" not in r]
    assert len(ea) == len(eb) == 2 and eb == pytest.approx(ea, abs=2e-5)

    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 5e-5

    # Only rank 0 wrote: each step logged once, the same files as a one-process run, nothing half-written.
    steps = [r["step"] for r in _records(two) if "loss" in r]
    assert steps == [1, 2, 3, 4] and sum(r.get("event") == "done" for r in _records(two)) == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_two_gloo_processes_match_one_process_and_resume(one_process, tmp_path, capsys):
    import torch

    from phikit.cli.main import main

    common, one = one_process
    two = tmp_path / "two"

    # 2 processes, stopped right after the step-2 checkpoint as if killed; then resumed, still on 2
    # processes, through the CLI's own relaunch (phikit train --gpus 2).
    assert launch(make_config(**common, out=str(two), grad_accum=2), 2, stop_after=2) == 0
    blob = torch.load(two / "checkpoints" / "step-0000002" / "trainer.pt", weights_only=False)
    assert len(blob["rng_ranks"]) == 2 and blob["state"]["world_size"] == 2
    cfg_file = tmp_path / "two.json"
    cfg_file.write_text(json.dumps(dict(common, out=str(two), grad_accum=2)))
    assert main(["train", "--config", str(cfg_file), "--gpus", "2", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    _assert_same_run(one, two)
    meta = json.loads((two / "phikit.json").read_text())
    assert meta["processes"] == 2 and meta["config"]["grad_accum"] == 2 and meta["steps"] == 4

    # A checkpoint of 2 processes is not resumed by 1: the global batch and the schedule would change.
    with pytest.raises(PhikitError, match="2 process"):
        train(make_config(**common, out=str(two), grad_accum=2, resume=True))


def test_fsdp_two_gloo_processes_match_one_process_and_resume(one_process, tmp_path, capsys):
    """FSDP2 (fully_shard per decoder layer and the loss root) on 2 gloo processes: the same steps as one process,
    the adapter gathered whole by rank 0, and a resume from full optimizer state."""
    import torch

    from phikit.cli.main import main

    common, one = one_process
    two = tmp_path / "fsdp"
    assert launch(make_config(**common, out=str(two), grad_accum=2, strategy="fsdp"), 2, stop_after=2) == 0
    blob = torch.load(two / "checkpoints" / "step-0000002" / "trainer.pt", weights_only=False)
    assert blob["state"]["strategy"] == "fsdp" and len(blob["rng_ranks"]) == 2
    # Full (gathered) tensors, not one rank's shards: the shapes of the one-process run's LoRA weights.
    ref = torch.load(one / "checkpoints" / "step-0000002" / "trainer.pt", weights_only=False)
    assert sorted(t.shape for t in blob["fsdp_weights"].values()) == sorted(t.shape for t in ref["adapter"].values())
    assert all(type(t) is torch.Tensor for t in blob["fsdp_weights"].values())

    cfg_file = tmp_path / "fsdp.json"
    cfg_file.write_text(json.dumps(dict(common, out=str(two), grad_accum=2)))
    assert main(["train", "--config", str(cfg_file), "--gpus", "2", "--strategy", "fsdp", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    _assert_same_run(one, two)
    meta = json.loads((two / "phikit.json").read_text())
    assert meta["processes"] == 2 and meta["strategy"] == "fsdp" and meta["steps"] == 4

    # An FSDP checkpoint holds full state dicts keyed by parameter name: a DDP run does not take it.
    with pytest.raises(PhikitError, match="strategy fsdp run"):
        train(make_config(**common, out=str(two), grad_accum=2, resume=True))


def test_fsdp_refuses_nf4():
    from phikit.train.distributed import check_strategy

    with pytest.raises(PhikitError, match="NF4"):
        check_strategy("fsdp", "nf4")
    check_strategy("ddp", "nf4")
    check_strategy("fsdp", "none")
    with pytest.raises(PhikitError, match="choose one of"):
        check_strategy("zero3", "none")
