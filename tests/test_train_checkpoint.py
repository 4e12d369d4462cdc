"""Checkpoints: atomic writes, pruning, and a full disk that leaves the previous one intact."""

import errno

import pytest

from phikit.errors import PhikitError
from phikit.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def _setup():
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched):
    import torch

    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_keep_last_and_roundtrip(tmp_path):
    import torch

    model, opt, sched = _setup()
    for s in range(1, 5):
        _step(model, opt, sched)
        save_checkpoint(tmp_path, s, model, opt, sched, {"step": s}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched)
    assert load_checkpoint(list_checkpoints(tmp_path)[-1], model, opt, sched) == {"step": 4}
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    assert sched.last_epoch == 4


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    model, opt, sched = _setup()
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=1)

    def full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    _step(model, opt, sched)
    with pytest.raises(PhikitError, match="step-0000001, is intact"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))
    assert load_checkpoint(list_checkpoints(tmp_path)[-1], model, opt, sched) == {"step": 1}
