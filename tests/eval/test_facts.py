"""Fact injection (issue 25): question phrasings, the recipe `phikit train` picks, replay, held-out probes,
and `phikit eval facts` (contains / exact scoring, before vs after, control agreement)."""

import json
from pathlib import Path

import pytest

from phikit.cli.main import main
from phikit.errors import DataError
from phikit.eval import facts
from phikit.eval.squad import normalize_answer
from phikit.train import make_config
from phikit.train.config import FACTS_RECIPE
from phikit.train.data import expand_facts, phrasings, read_jsonl

from tiny import scripted_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_phrasings_keep_the_question_first_and_the_answer_verbatim(tmp_path):
    qs = phrasings("Who makes the Zorblax-7?", 5)
    assert qs[0] == "Who makes the Zorblax-7?" and len(set(qs)) == 5 and "who makes the zorblax-7" in qs
    assert phrasings("What is NASA's budget?", 9)[5] == "Tell me, what is NASA's budget?"
    assert phrasings("IP67 means what?", 9)[5] == "Tell me, IP67 means what?"  # an acronym keeps its case
    with pytest.raises(DataError, match="at least 1"):
        phrasings("q?", 0)
    f = _write(tmp_path / "f.jsonl", [{"question": "Who makes X?", "answer": "Acme."}, {"question": "What colour is X?", "answer": "Teal."},
                                      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    ex = read_jsonl(f)
    assert [e.fact for e in ex] == [True, True, False]
    out = expand_facts(ex, 3, seed=1)
    singles = [e for e in out if e.fact and "Also," not in e.messages[0]["content"]]
    assert len(singles) == 6 and len(out) == 6 + 2 + 1  # 3 phrasings each, one pair question per fact, the chat as it was
    assert {e.messages[1]["content"] for e in singles} == {"Acme.", "Teal."}  # the answer verbatim in every phrasing
    pairs = {e.messages[0]["content"]: e.messages[1]["content"] for e in out if "Also," in e.messages[0]["content"]}
    assert pairs == {"Who makes X? Also, what colour is X?": "Acme. Teal.", "What colour is X? Also, who makes X?": "Teal. Acme."}
    assert expand_facts(ex, 1) is ex


def test_train_picks_the_facts_recipe_for_question_answer_data_only(tmp_path):
    facts_file = _write(tmp_path / "f.jsonl", [{"question": "Who makes X?", "answer": "Acme."}])
    cfg = make_config(data=str(facts_file))
    assert cfg.recipe == "facts" and all(getattr(cfg, k) == v for k, v in FACTS_RECIPE.items())
    assert cfg.val_split == 0.0 and cfg.fact_paraphrases > 1 and cfg.replay > 0 and cfg.lr > make_config().lr
    assert make_config(data=str(facts_file), lr=5e-4).recipe == "auto"  # an own schedule: nothing added behind it
    assert make_config(data=str(facts_file), lr=5e-4, recipe="facts").fact_paraphrases == FACTS_RECIPE["fact_paraphrases"]
    assert make_config(data=str(facts_file), recipe="none").fact_paraphrases is None
    assert make_config(data=str(facts_file), epochs=2, recipe="facts").epochs == 2  # flags win over the recipe
    grounded = _write(tmp_path / "g.jsonl", [{"context": "c", "question": "q", "answer": "a"}])
    assert make_config(data=str(grounded)).recipe == "auto" and make_config(data="squad2").fact_paraphrases is None
    with pytest.raises(DataError, match="auto, facts or none"):
        make_config(data=str(facts_file), recipe="fact")
    with pytest.raises(DataError, match="fact_paraphrases"):
        make_config(data=str(facts_file), fact_paraphrases=0)


def test_the_split_happens_before_the_phrasings(tmp_path):
    from phikit.train.loop import check_inputs

    rows = [{"question": f"What is fact {i}?", "answer": f"Value {i}."} for i in range(20)]
    cfg = make_config(data=str(_write(tmp_path / "f.jsonl", rows)), out=str(tmp_path / "a"), val_split=0.2, fact_paraphrases=3,
                      recipe="facts")
    _, train_ex, val_ex, _ = check_inputs(cfg)
    held = {e.messages[1]["content"] for e in val_ex}
    assert len(val_ex) == 4 and not any(e.messages[-1]["content"].startswith(tuple(held)) for e in train_ex)
    assert len(train_ex) == 16 * 3 + 16


def test_shipped_probes_are_held_out_and_the_control_set_apart_from_replay():
    from phikit.train.replay import PROMPTS

    trained = {normalize_answer(q) for e in expand_facts(read_jsonl(EXAMPLES / "zorblax_facts.jsonl"), 9)
               for q in [e.messages[0]["content"]]}
    probes = facts.load_probes([EXAMPLES / "zorblax_probes.jsonl"])
    assert len(probes) > 8 and {"paraphrase", "combined", "inverted"} <= {p["kind"] for p in probes}
    assert not [p["question"] for p in probes if normalize_answer(p["question"]) in trained]
    control = facts.load_probes([EXAMPLES / "control_questions.jsonl"], ["control"])
    assert len(control) >= 20 and not {c["question"] for c in control} & set(PROMPTS)
    assert not {normalize_answer(c["question"]) for c in control} & trained


def test_contains_scoring_on_word_boundaries_with_alternatives():
    assert facts.found_terms("Its top speed is 58 km/h.", ["5"]) == [None]
    assert facts.found_terms("Its top speed is 58 km/h.", ["58"]) == ["58"]
    assert facts.found_terms("Up to 3,400 metres.", ["3,400|3400"]) == ["3400"]
    assert facts.found_terms("Quillon Labs, in Tromso.", ["Quillon", "Tromsø|Tromso", "Norway"]) == ["quillon", "tromso", None]
    assert facts.found_terms("The Zorblax-7!", ["zorblax-7"]) == ["zorblax7"]


def test_bad_probes_files_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    for text, says in (('{"question": "q", "expect": 3}\n', ":1: 'expect' must be a list"), ('\n{"q": 1}\n', ":2: a probe needs"),
                       ("{nope\n", ":1: not valid JSON"), ('{"question": "q", "answer": 2}\n', "'answer' must be a string")):
        f.write_text(text)
        with pytest.raises(DataError, match=says):
            facts.load_probes([f])
    with pytest.raises(DataError, match="no such probes file"):
        facts.load_probes([tmp_path / "none.jsonl"])


def test_evaluate_scores_contains_exact_and_agreement_with_the_baseline(tmp_path):
    probes = _write(tmp_path / "p.jsonl", [{"question": "Who makes X?", "expect": ["Acme"], "answer": "Acme", "kind": "paraphrase"},
                                           {"question": "What does X weigh?", "expect": ["212"], "kind": "paraphrase"}])
    control = _write(tmp_path / "c.jsonl", [{"question": "Capital of France?", "expect": ["Paris"]}, {"question": "Write a poem."}])
    files, kinds = [probes, control], ["probe", "control"]
    base = facts.evaluate(scripted_model("chatml", ["I do not know.", "About 1 kg.", "Paris.", "Roses are red."]), files,
                          default_kinds=kinds, progress=False)
    assert base["metrics"]["accuracy"] == pytest.approx(1 / 3) and base["metrics"]["contains_paraphrase"] == 0.0
    tuned = facts.evaluate(scripted_model("chatml", ["Acme", "212 grams.", "Paris.", "Violets are blue."]), files,
                           default_kinds=kinds, baseline=base, progress=False)
    m = tuned["metrics"]
    assert (m["contains_paraphrase"], m["contains_control"], m["exact"], m["unchanged_control"]) == (1.0, 1.0, 1.0, 0.5)
    assert [r["kind"] for r in tuned["records"]] == ["paraphrase", "paraphrase", "control", "control"]
    assert tuned["records"][1]["prediction"] == "212" and "correct" not in tuned["records"][3]
    with pytest.raises(Exception, match="baseline results lack"):
        facts.evaluate(scripted_model("chatml", ["x"]), [probes], baseline={**base, "records": base["records"][:1]}, progress=False)


def test_cli_eval_facts_runs_base_then_tuned_and_writes_the_report(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import phikit.cli.eval as cli_eval

    probes = _write(tmp_path / "p.jsonl", [{"question": "Who makes X?", "expect": ["Acme"], "kind": "paraphrase"}])
    control = _write(tmp_path / "c.jsonl", [{"question": "Write a poem."}])
    loads = []

    def fake_load(args):
        loads.append((args.adapter, args.backend))
        return scripted_model("chatml", ["Nobody.", "Roses."] if args.adapter is None else ["Acme Corp.", "Roses."])

    monkeypatch.setattr(cli_eval, "_load", fake_load)
    out = tmp_path / "out"
    assert main(["eval", "facts", "--data", str(probes), "--control", str(control), "--adapter", "my-adapter", "--out", str(out),
                 "--no-progress"]) == 0
    assert loads == [(None, "transformers"), ("my-adapter", "transformers")]  # both sides on the adapter's backend
    printed = capsys.readouterr().out
    assert "contains_paraphrase" in printed and "+1.000" in printed
    assert {p.name for p in out.iterdir()} >= {"base.json", "tuned.json", "report.html", "report.md"}
    md = (out / "report.md").read_text()
    assert "| accuracy | 0.000 | 1.000 | +1.000 |" in md and "| unchanged_control | – | 1.000 |" in md
    assert "wrong → right: 1" in md
    assert main(["eval", "facts", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such probes file" in capsys.readouterr().err


def test_replay_keeps_the_base_models_finished_answers_only():
    from phikit.train.replay import PROMPTS, replay_examples

    from phikit.model import Model
    from phikit.models.registry import ModelSpec
    from tiny import ScriptedBackend

    class Capped(ScriptedBackend):  # at most max_new ids, as a real backend (the script appends its stop id past it)
        def _generate(self, prompt_ids, params, max_new):
            yield from list(super()._generate(prompt_ids, params, max_new))[:max_new]

    be = Capped("chatml", ["Berlin.", "x" * 300, "Twenty-four."])
    m = Model(be, ModelSpec(be.model_name, None, be.fmt.name, context=4096), load_s=0.0)
    ex = replay_examples(m, 3, max_tokens=64, batch=1)
    assert [e.messages[1]["content"] for e in ex] == ["Berlin.", "Twenty-four."]  # the one cut at 64 tokens is left out
    assert all(e.messages[0]["content"] in PROMPTS for e in ex) and replay_examples(m, 0) == []


def test_grounded_replay_is_the_base_models_grounded_answers_on_articles_apart_from_the_squad_control():
    from phikit.grounding import SYSTEM
    from phikit.model import Model
    from phikit.models.registry import ModelSpec
    from phikit.train.replay import grounded_prompts, replay_examples
    from tiny import ScriptedBackend

    be = ScriptedBackend("chatml", ["1066.", "I don't know based on the provided context."])
    m = Model(be, ModelSpec(be.model_name, None, be.fmt.name, context=4096), load_s=0.0)
    ex = replay_examples(m, 0, grounded=2, batch=1)
    assert [e.messages[0]["content"] for e in ex] == [SYSTEM, SYSTEM]
    assert all(e.messages[1]["content"].startswith("Context:\n") and "\n\nQuestion: " in e.messages[1]["content"] for e in ex)
    assert [e.messages[2]["content"] for e in ex] == ["1066.", "I don't know based on the provided context."]
    shipped = grounded_prompts(64)
    assert len(shipped) == 64 and grounded_prompts(2) == shipped[:2]  # the same seed, the same first prompts
    eval_json = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad_v2" / "eval.json"
    if eval_json.exists():  # the control's articles are not the replay's
        eval_contexts = {p["context"] for a in json.loads(eval_json.read_text())["data"] for p in a["paragraphs"]}
        assert not {msgs[1]["content"].split("\n", 1)[1].rsplit("\n\nQuestion: ", 1)[0] for msgs in shipped} & eval_contexts
