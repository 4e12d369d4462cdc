"""`phikit train`'s flags come from the training config's fields: each field a flag, each flag a field."""

from __future__ import annotations

import pytest

from phikit.cli.main import build_parser
from phikit.cli.train import CONFIG_ONLY, config_from
from phikit.train.config import TrainConfig, config_fields

# The flags `phikit train` had when they were written out by hand: each must keep working.
FLAGS = ["--data", "--out", "--config", "--model", "-m", "--quant", "--device", "--format", "--lora-r", "--lora-alpha",
         "--lora-dropout", "--lora-targets", "--lr", "--warmup-ratio", "--epochs", "--micro-batch", "--grad-accum",
         "--optimizer", "--weight-decay", "--max-seq", "--group-by-length", "--gradient-checkpointing", "--compile",
         "--offload-activations", "--seed", "--limit", "--max-steps", "--val-split", "--val-data",
         "--squad-answerable-ratio", "--squad-max-context-words", "--squad-questions-per-context", "--save-every",
         "--keep-last", "--resume", "--gpus", "--strategy", "--no-progress"]


def parse(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert f"{flag} " in out or f"{flag}," in out or f"{flag}\n" in out, flag
    assert "peak learning rate, cosine decay [2e-4]" in out and "SQuAD: answerable per unanswerable example" in out


def test_no_flag_given_is_the_defaults():
    assert config_from(parse()) == TrainConfig()


def test_every_config_field_is_a_flag_that_reaches_the_config():
    fields = config_fields()
    assert set(fields) - CONFIG_ONLY <= set(vars(parse()))
    argv = ["--data", "d.jsonl", "-m", "tiny", "--quant", "nf4", "--lora-r", "8", "--lora-targets", "q_proj, v_proj",
            "--lr", "1e-3", "--epochs", "0.5", "--group-by-length", "false", "--compile", "on", "--max-grad-norm", "0.5",
            "--eval-every-epoch", "no", "--resume", "--no-progress", "--strategy", "fsdp", "--squad-answerable-ratio", "2"]
    cfg = config_from(parse(*argv))
    assert (cfg.data, cfg.model, cfg.quant, cfg.lora_r, cfg.lora_targets, cfg.lr, cfg.epochs) == \
        ("d.jsonl", "tiny", "nf4", 8, ["q_proj", "v_proj"], 1e-3, 0.5)
    assert (cfg.group_by_length, cfg.compile, cfg.max_grad_norm, cfg.eval_every_epoch, cfg.resume, cfg.progress) == \
        (False, True, 0.5, False, True, False)
    assert (cfg.strategy, cfg.squad_answerable_ratio) == ("fsdp", 2.0)


def test_flags_win_over_the_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"lora_r": 4, "epochs": 2, "max_grad_norm": 0.25}')
    cfg = config_from(parse("--config", str(f), "--epochs", "1"))
    assert (cfg.lora_r, cfg.epochs, cfg.max_grad_norm) == (4, 1.0, 0.25)
