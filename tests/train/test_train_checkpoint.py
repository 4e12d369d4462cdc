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


class _Pwn:
    """Unpickling this runs os.mkdir(marker): what a crafted trainer.pt could do on --resume."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_crafted_trainer_pt_is_refused_and_never_run(tmp_path):
    import torch

    model, opt, sched = _setup()
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=2)
    ckpt = list_checkpoints(tmp_path)[-1]
    blob = torch.load(ckpt / "trainer.pt", weights_only=True)  # what phikit writes loads as plain data
    marker = tmp_path / "code-ran"
    blob["state"] = _Pwn(marker)
    torch.save(blob, ckpt / "trainer.pt")
    with pytest.raises(PhikitError, match=r"trainer\.pt holds more than tensors and plain values.*posix\.mkdir.*Delete"):
        load_checkpoint(ckpt, model, opt, sched)
    assert not marker.exists()


def test_rng_states_survive_the_plain_data_round_trip(tmp_path):
    import random

    import numpy as np
    import torch

    model, opt, sched = _setup()
    _step(model, opt, sched)
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # numpy then holds a cached gaussian: part of its state
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=2)
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(list_checkpoints(tmp_path)[-1], model, opt, sched)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want


def test_checkpoint_of_an_earlier_version_with_numpy_rng_still_loads(tmp_path):
    """Before weights_only loading, numpy's RNG state went in as numpy's own tuple (an array inside)."""
    import random

    import numpy as np
    import torch

    model, opt, sched = _setup()
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=2)
    ckpt = list_checkpoints(tmp_path)[-1]
    blob = torch.load(ckpt / "trainer.pt", weights_only=True)
    np.random.seed(7)
    blob["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(blob, ckpt / "trainer.pt")
    want = np.random.standard_normal(2).tolist()
    assert load_checkpoint(ckpt, model, opt, sched) == {"step": 1}
    assert np.random.standard_normal(2).tolist() == want


def test_resaving_a_step_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os

    model, opt, sched = _setup()
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2, "run": "first"}, keep_last=1)
    real = os.replace

    def killed(src, dst):  # the process dies just before the new checkpoint's rename
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2, "run": "second"}, keep_last=1)
    monkeypatch.undo()
    (ckpt,) = list_checkpoints(tmp_path)  # the first save, still there (moved aside, not deleted)
    assert load_checkpoint(ckpt, model, opt, sched) == {"step": 2, "run": "first"}
    save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2, "run": "third"}, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1], model, opt, sched) == {"step": 2, "run": "third"}


def test_resumed_log_drops_a_torn_last_line_atomically(tmp_path, monkeypatch):
    import json
    import os

    from phikit.train.logs import TrainLog

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed while appending step 4
    assert [r["step"] for r in TrainLog(tmp_path, resume_step=4).records()] == [1, 2, 3]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b))), real(a, b)))
    TrainLog(tmp_path, resume_step=2)
    assert (tmp_path / "log.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert renamed == [(str(tmp_path / ".log.jsonl.tmp"), str(tmp_path / "log.jsonl"))]  # rewritten beside, renamed over


def test_save_adapter_fsyncs_every_file_before_its_rename(tmp_path, monkeypatch):
    import os

    from phikit.train.loop import save_adapter

    model, _, _ = _setup()
    out = tmp_path / "run"
    out.mkdir()
    synced, events = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        assert str(src) in synced, f"{src} renamed into place before it was fsynced"
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_adapter(model, out, {"steps": 1})
    moved = [d for e, d in events if e == "replace"]
    assert {os.path.basename(d) for d in moved} >= {"adapter_model.safetensors", "adapter_config.json", "phikit.json"}
    assert moved[-1] == str(out / "phikit.json")  # the summary last: it marks a finished adapter
    last_file = max(i for i, (e, d) in enumerate(events) if e == "replace" and d != str(out / "phikit.json"))
    assert ("fsync", str(out)) in events[last_file:]  # the folder's entries on disk too
    assert sorted(p.name for p in out.iterdir()) == sorted({os.path.basename(d) for d in moved})
