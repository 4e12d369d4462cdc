"""Training data: reading, rendering through the chat format, completion-only labels, batching."""

import json

import pytest

from phikit.errors import DataError
from phikit.formats import get_format
from phikit.grounding import ABSTAIN
from phikit.train.config import make_config
from phikit.train.data import IGNORE, Example, Tokenised, batch_order, collate, read_jsonl, read_squad


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(f)
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*no assistant turn"):
        read_jsonl(f)
    f.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: a record needs"):
        read_jsonl(f)


def test_jsonl_kinds(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"context": "c", "question": "q", "answer": ABSTAIN}, {"question": "q", "answer": "a"}, {"text": "t"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_jsonl(f)
    assert ex[0].messages and ex[1].context == "c" and not ex[1].answerable and ex[3].text == "t"
    assert ex[1].chat()[0]["role"] == "system" and ex[1].chat()[-1] == {"role": "assistant", "content": ABSTAIN}


def test_squad_balancing(shared_data):
    ex = read_squad(shared_data / "squad_v2" / "train.json", answerable_ratio=2.0)
    has = sum(e.answerable for e in ex)
    no = len(ex) - has
    assert abs(has - 2 * no) <= 2 and no > 100
    assert all(e.answer == ABSTAIN for e in ex if not e.answerable)
    assert all(e.answer and e.answer in e.context for e in ex if e.answerable)


def test_squad_questions_per_context_groups_the_same_kept_questions(shared_data):
    path = shared_data / "squad_v2" / "train.json"
    flat = read_squad(path, answerable_ratio=2.0, max_context_words=120)
    grouped = read_squad(path, answerable_ratio=2.0, max_context_words=120, questions_per_context=4)
    pairs = lambda exs: sorted((e.context, q, a) for e in exs for q, a in [(e.question, e.answer)] + (e.followups or []))  # noqa: E731
    assert pairs(grouped) == pairs(flat)  # the same questions, only grouped
    assert len(flat) / 4 <= len(grouped) < len(flat) * 0.6
    assert max(1 + len(e.followups or []) for e in grouped) == 4
    chat = next(e for e in grouped if e.followups).chat()
    assert [m["role"] for m in chat[:5]] == ["system", "user", "assistant", "user", "assistant"]
    assert chat[3]["content"].startswith("Question: ") and chat[1]["content"].startswith("Context:\n")


@pytest.fixture(scope="module")
def chatml_tok(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["chatml"])
    return tok, get_format("chatml")


def test_labels_only_on_answer_with_end_of_turn(chatml_tok):
    tok, fmt = chatml_tok
    enc = Tokenised(tok, fmt, max_seq=2048)
    ids, labels = enc.encode(Example(context="Paris is in France.", question="Where is Paris?", answer="France"))
    assert len(ids) == len(labels)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert trained == "France<|im_end|>\n"  # the answer and the end-of-turn token, nothing of the prompt
    assert tok.decode(ids) == fmt.render(Example(context="Paris is in France.", question="Where is Paris?", answer="France").chat())
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # no BOS before each piece


def test_truncation_cuts_context_never_answer(chatml_tok):
    tok, fmt = chatml_tok
    enc = Tokenised(tok, fmt, max_seq=400)
    ids, labels = enc.encode(Example(context="word " * 500, question="What?", answer="the answer"))
    assert len(ids) <= 400 and enc.truncated == 1 and enc.dropped == 0
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "the answer<|im_end|>\n"
    assert "Question: What?" in tok.decode(ids)


def test_collate_pads_right_with_pad_not_eos(chatml_tok):
    tok, fmt = chatml_tok
    pad = tok.convert_tokens_to_ids(fmt.pad)
    assert pad != tok.convert_tokens_to_ids("<|im_end|>")
    ids, att, lab = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad)
    assert ids[1].tolist() == [8, pad, pad] and att[1].tolist() == [1, 0, 0] and lab[1].tolist() == [8, IGNORE, IGNORE]


def test_batch_order_is_deterministic_and_grouped():
    lengths = [(i * 37) % 101 for i in range(400)]
    a = batch_order(lengths, 4, seed=42, epoch=0, group_by_length=True)
    assert a == batch_order(lengths, 4, seed=42, epoch=0, group_by_length=True)
    assert a != batch_order(lengths, 4, seed=42, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10  # length-grouped: little padding


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nlora_r: 8\nmicro-batch: 2\n")
    cfg = make_config(str(f), lora_r=32, epochs=None)
    assert (cfg.lr, cfg.lora_r, cfg.micro_batch, cfg.epochs, cfg.lora_alpha) == (0.001, 32, 2, 3, 16)
    f.write_text('{"lrr": 1}')
    f2 = tmp_path / "c.json"
    f2.write_text('{"lrr": 1}')
    with pytest.raises(DataError, match="unknown setting"):
        make_config(str(f2))


def test_shipped_cpu_recipe_is_a_valid_config(tmp_path):
    from pathlib import Path

    from phikit.train import make_config

    recipe = Path(__file__).resolve().parents[2] / "examples" / "squad_cpu_recipe.yaml"
    cfg = make_config(str(recipe), out=str(tmp_path / "a"), limit=5)  # flags win over the file
    assert (cfg.squad_questions_per_context, cfg.squad_answerable_ratio, cfg.lr, cfg.limit) == (4, 2.0, 2e-3, 5)
