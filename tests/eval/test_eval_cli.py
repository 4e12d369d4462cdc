"""`phikit eval`: scoring a predictions file, GSM8K scoring, reports, bad input; one real run of the embedded model."""

import json

import pytest

from phikit.cli.main import main
from phikit.errors import DataError
from phikit.eval import gsm8k

from test_eval_squad import DATA


@pytest.fixture
def squad_file(tmp_path):
    p = tmp_path / "squad.json"
    p.write_text(json.dumps({"version": "v2.0", "data": DATA}))
    return p


def test_predictions_file_prints_the_official_output(squad_file, tmp_path, capsys):
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"q1": "Norway", "q2": "The 10th and 11th centuries.", "q3": "", "q4": "Rollo"}))
    out = tmp_path / "res.json"
    assert main(["eval", "squad2", "--data", str(squad_file), "--predictions", str(preds), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx({"exact": 50.0, "f1": 60.0, "total": 4, "HasAns_exact": 50.0, "HasAns_f1": 70.0,
                                     "HasAns_total": 2, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2})
    res = json.loads(out.read_text())
    assert res["metrics"]["hallucination_rate"] == pytest.approx(1 / 4)  # "Rollo" for an unanswerable question
    assert [r["exact"] for r in res["records"]] == [0, 1, 1, 0]
    assert len(res["meta"]["data_sha256"]) == 64 and res["meta"]["packages"]["python"]


@pytest.mark.parametrize("content,msg", [("[1, 2]", "must be one JSON object"), ("{nope", "is not JSON"), ('{"q1": 3}', "answer strings")])
def test_bad_predictions_file_is_a_clear_error(squad_file, tmp_path, capsys, content, msg):
    preds = tmp_path / "preds.json"
    preds.write_text(content)
    assert main(["eval", "squad2", "--data", str(squad_file), "--predictions", str(preds)]) == 2
    assert msg in capsys.readouterr().err


def test_gsm8k_gold_and_answer_reading(tmp_path):
    assert gsm8k.gold_number("She makes 9 * 2 = $18.\n#### 1,818") == 1818.0
    assert gsm8k.gold_number("#### -3.5") == -3.5
    with pytest.raises(DataError, match="####"):
        gsm8k.gold_number("no marker 42")
    assert gsm8k.read_answer("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\nAnswer: $1,818")[1] == 1818.0
    assert gsm8k.same_number(18.0, 18) and not gsm8k.same_number(None, 18.0) and not gsm8k.same_number(17.0, 18.0)
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "q1", "answer": "x\\n#### 5"}\n\n{"question": "q2", "answer": "#### 7"}\n{"question": "q3", "answer": "#### 9"}\n')
    items = gsm8k.load_gsm8k(f, limit=2)
    assert [(i["question"], i["gold"]) for i in items] == [("q1", 5.0), ("q2", 7.0)]
    f.write_text('{"q": 1}\n')
    with pytest.raises(DataError, match=":1: expected a JSON object"):
        gsm8k.load_gsm8k(f)


def _results(task, records, metrics, sha="a" * 64):
    meta = {"task": task, "model": "m", "backend": "llamacpp", "adapter": None, "limit": None, "data_sha256": sha,
            "prompt": {"system": "s"}, "sampling": {"temperature": 0.0}, "date": "2026-01-01", "run_s": 1.0}
    return {"meta": meta, "metrics": metrics, "records": records}


def test_report_has_deltas_plots_and_changed_items(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base = [{"qid": "q1", "question": "Where?", "gold": ["Norway"], "reply": "Sweden", "prediction": "Sweden", "exact": 0, "latency_s": 0.5},
            {"qid": "q2", "question": "When?", "gold": [""], "reply": "", "prediction": "", "exact": 1, "latency_s": 0.7}]
    tuned = [{**base[0], "reply": "Norway", "prediction": "Norway", "exact": 1, "latency_s": 0.4},
             {**base[1], "reply": "1066", "prediction": "1066", "exact": 0, "latency_s": 0.6}]
    a, b = tmp_path / "base.json", tmp_path / "tuned.json"
    a.write_text(json.dumps(_results("squad2", base, {"exact": 50.0, "f1": 50.0, "hallucination_rate": 0.5})))
    b.write_text(json.dumps(_results("squad2", tuned, {"exact": 50.0, "f1": 62.5, "hallucination_rate": 0.25}, sha="b" * 64)))
    out = tmp_path / "r" / "report.html"
    assert main(["eval", "report", str(a), str(b), "--out", str(out)]) == 0
    html, md = out.read_text(), out.with_suffix(".md").read_text()
    assert html.count("src='data:image/png;base64,") == 2
    assert "| f1 | 50.000 | 62.500 | +12.500 |" in md
    assert "| hallucination_rate | 0.500 | 0.250 | -0.250 |" in md
    assert "right → wrong: 1, wrong → right: 1" in md and "| Where? | Norway | Sweden | Norway |" in md
    assert "different data file" in md  # the hashes differ: visibly not comparable


def test_report_refuses_mixed_tasks(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results("squad2", [], {})))
    b.write_text(json.dumps(_results("gsm8k", [], {})))
    assert main(["eval", "report", str(a), str(b), "--out", str(tmp_path / "r.html")]) == 2
    assert "different tasks" in capsys.readouterr().err


def test_retrieved_context_needs_a_store(squad_file, capsys):
    assert main(["eval", "squad2", "--data", str(squad_file), "--context", "retrieved"]) == 2
    assert "--store" in capsys.readouterr().err


@pytest.mark.e2e
def test_squad2_cli_runs_the_embedded_model(embedded_gguf, squad_file, tmp_path, capsys):
    from phikit.grounding import SYSTEM

    out = tmp_path / "res.json"
    argv = ["eval", "squad2", "--data", str(squad_file), "--limit", "2", "--max-tokens", "12", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "HasAns_f1" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["metrics"]["total"] == 2 and len(res["records"]) == 2
    assert res["meta"]["prompt"]["system"] == SYSTEM and res["meta"]["seed"] == 0 and res["meta"]["limit"] == 2
    assert res["meta"]["sampling"]["temperature"] == 0.0 and res["meta"]["model"] == "smollm2-135m"
    r = res["records"][0]
    assert r["completion_tokens"] >= 1 and r["latency_s"] > 0 and 0 <= r["f1"] <= 1
    assert r["prediction"] == ("" if r["abstained"] else r["reply"])
    assert res["metrics"]["latency_p50_s"] > 0 and res["metrics"]["tokens_per_s"] is not None


@pytest.mark.e2e
def test_gsm8k_cli_runs_the_embedded_model(embedded_gguf, tmp_path):
    from phikit.chat.reasoning import REASON_PROMPT

    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    out = tmp_path / "g.json"
    assert main(["eval", "gsm8k", "--data", str(data), "--reason", "--max-tokens", "24", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["prompt"]["system"] == REASON_PROMPT and res["metrics"]["total"] == 1
    r = res["records"][0]
    assert r["gold"] == 5.0 and r["correct"] == (r["prediction"] == 5.0)
