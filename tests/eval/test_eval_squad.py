"""SQuAD 2.0 scoring pinned to the official script's behaviour, on crafted cases and hand-computed values."""

import json

import pytest

from phikit.errors import DataError
from phikit.eval import squad
from phikit.eval.squad import compute_exact, compute_f1, normalize_answer, official_eval


def make_data(qas_by_context):
    """SQuAD 2.0 "data" list from [(context, [(qid, question, [answer texts])])]."""
    paras = [{"context": c, "qas": [{"id": i, "question": q, "answers": [{"text": a, "answer_start": 0} for a in ans],
                                     "is_impossible": not ans} for i, q, ans in qas]} for c, qas in qas_by_context]
    return [{"title": "T", "paragraphs": paras}]


CTX = "The Norse came from Denmark, Iceland and Norway in the 10th and 11th centuries. Their leader was Rollo."
DATA = make_data([(CTX, [
    ("q1", "Where did the Norse come from?", ["Denmark, Iceland and Norway"]),
    ("q2", "When?", ["10th and 11th centuries", "in the 10th and 11th centuries"]),
    ("q3", "Who was the king of France?", []),
    ("q4", "Who was the first duke?", []),
])])


@pytest.mark.parametrize("text,norm", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theory of anthems", "theory of anthems"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("a-b", "ab"),  # punctuation is deleted, not turned into a space
    ("The", ""),
    ("  tab\tand\nnewline ", "tab and newline"),
    ("Ça, c'est L'ÉTÉ", "ça cest lété"),  # only ASCII punctuation goes; case folds
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_exact_and_f1_hand_computed():
    assert compute_exact("The Eiffel Tower", "eiffel tower.") == 1
    assert compute_exact("Eiffel Tower", "the tower") == 0
    # gold [cat sat on mat], pred [cat on mat]: P = 3/3, R = 3/4, F1 = 2PR/(P+R) = 6/7
    assert compute_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # token bags, not sets: gold [a? no] [x x y], pred [x y y] -> common x1 y1 = 2, P = R = 2/3
    assert compute_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert compute_f1("Paris", "London") == 0
    # a no-answer on either side: 1 only when both are empty
    assert compute_f1("", "") == 1 and compute_f1("", "Paris") == 0 and compute_f1("Paris", "") == 0
    assert compute_f1("the", "") == 1  # "the" normalises to nothing


def test_official_eval_hand_computed():
    preds = {"q1": "Norway", "q2": "The 10th and 11th centuries.", "q3": "", "q4": "Rollo"}
    out, exact, f1 = official_eval(DATA, preds)
    # q1: EM 0, F1 2*(1*.25)/(1.25) = 0.4; q2: EM 1 (max over golds); q3: "" on unanswerable = 1; q4: 0
    assert exact == {"q1": 0, "q2": 1, "q3": 1, "q4": 0}
    assert f1 == pytest.approx({"q1": 0.4, "q2": 1, "q3": 1, "q4": 0})
    assert list(out) == list(squad.OFFICIAL_KEYS)
    assert out == pytest.approx({"exact": 50.0, "f1": 60.0, "total": 4, "HasAns_exact": 50.0, "HasAns_f1": 70.0,
                                 "HasAns_total": 2, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2})


def test_several_gold_answers_take_the_max():
    data = make_data([("ctx", [("q", "?", ["France", "the French Republic"])])])
    out, exact, f1 = official_eval(data, {"q": "French"})
    assert exact["q"] == 0
    assert f1["q"] == pytest.approx(2 / 3)  # against "french republic": P 1, R 1/2


def test_gold_that_normalises_to_nothing_is_unanswerable_but_stays_in_hasans():
    # The official script: gold texts that normalise to "" are dropped (-> [""]) while the
    # HasAns/NoAns split goes by whether `answers` is non-empty.
    data = make_data([("ctx", [("q", "?", ["The"])])])
    out, _, _ = official_eval(data, {"q": ""})
    assert out["exact"] == 100.0 and out["HasAns_total"] == 1 and "NoAns_total" not in out


def test_missing_prediction_is_reported_and_left_out(capsys):
    out, exact, _ = official_eval(DATA, {"q1": "Denmark, Iceland and Norway", "q3": ""})
    assert "Missing prediction for q2" in capsys.readouterr().err
    assert set(exact) == {"q1", "q3"}
    assert out["total"] == 2 and out["exact"] == 100.0 and out["missing"] == 2
    assert out["HasAns_total"] == 1 and out["NoAns_total"] == 1


def test_no_prediction_at_all_is_an_error():
    with pytest.raises(DataError, match="no question"):
        official_eval(DATA, {"other": "x"}, warn=False)


def test_extra_metrics_hand_computed():
    recs = [
        {"has_answer": True, "prediction": "Norway", "unsupported": False},
        {"has_answer": True, "prediction": "Sweden", "unsupported": True},  # made up
        {"has_answer": True, "prediction": "", "unsupported": False},  # wrongly abstained
        {"has_answer": False, "prediction": "", "unsupported": False},  # rightly abstained
        {"has_answer": False, "prediction": "Rollo", "unsupported": False},  # answered the unanswerable
    ]
    m = squad.extra_metrics(recs)
    assert m["abstain_rate"] == pytest.approx(2 / 5)
    assert m["abstain_precision"] == pytest.approx(1 / 2)
    assert m["abstain_recall"] == pytest.approx(1 / 2)
    assert m["answered_unanswerable_rate"] == pytest.approx(1 / 2)
    assert m["unsupported_answer_rate"] == pytest.approx(1 / 3)
    assert m["hallucination_rate"] == pytest.approx(2 / 5)  # Sweden and Rollo
    assert m["mean_answer_words"] == pytest.approx(1.0)


def test_unsupported_words():
    assert squad.unsupported("Sweden", CTX)
    assert not squad.unsupported("the Norway.", CTX)
    assert not squad.unsupported("", CTX)


def test_questions_limit_and_restrict():
    qs = squad.questions(DATA, limit=3)
    assert [q.qid for q in qs] == ["q1", "q2", "q3"] and qs[2].golds == [""] and not qs[2].has_answer
    small = squad.restrict(DATA, {"q2", "q4"})
    assert [qa["id"] for qa in squad.iter_qas(small)] == ["q2", "q4"]


def test_load_squad_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="not SQuAD 2.0"):
        squad.load_squad(bad)
    with pytest.raises(DataError, match="no such file"):
        squad.load_squad(tmp_path / "missing.json")


def test_merge_of_shards_scores_like_one_run(tmp_path):
    from phikit.eval.squad import merge_squad, squad_metrics

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": "v2.0", "data": DATA}))
    preds = {"q1": "Norway", "q2": "10th and 11th centuries", "q3": "", "q4": "Rollo"}

    def recs(qids):
        return [{"qid": q, "has_answer": q in ("q1", "q2"), "prediction": preds[q], "unsupported": False,
                 "latency_s": 1.0, "ttft_s": 0.5, "completion_tokens": 3} for q in qids]

    meta = {"task": "squad2", "run_s": 1.0, "data": "s", "data_sha256": "x", "date": "d"}
    merged = merge_squad([{"meta": meta, "records": recs(["q3", "q4"])}, {"meta": meta, "records": recs(["q1", "q2"])}], path)
    # Shards ran in parallel: the run's wall time is the longest shard's (1 s), not the sum.
    whole = squad_metrics(DATA, recs(["q1", "q2", "q3", "q4"]), wall_s=1.0)
    assert merged["metrics"] == whole
    assert merged["metrics"]["throughput_tokens_per_s"] == 12 / 1.0
    assert [r["qid"] for r in merged["records"]] == ["q1", "q2", "q3", "q4"]
    with pytest.raises(Exception, match="overlap"):
        merge_squad([{"meta": meta, "records": recs(["q1"])}, {"meta": meta, "records": recs(["q1"])}], path)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    from phikit.eval.runner import percentile

    xs = [0.3, 1.2, 0.9, 5.0, 2.2, 0.1, 0.7]
    for q in (50, 95):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None and percentile([2.0], 95) == 2.0
