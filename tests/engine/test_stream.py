"""The one stream: detokenisation, stop ids and strings, finish reasons, context errors.

A scripted backend stands in for the model here so every edge is exercised
exactly; the real backends are covered in test_load.py and test_e2e.py.
"""

import pytest

from phikit.engine.backend import IncrementalDetokenizer, LocalBackend, StopStrings
from phikit.engine.types import SamplingParams, join
from phikit.errors import ContextLengthError, PhikitError
from phikit.formats import CHATML

STOP_ID = 1000


class Scripted(LocalBackend):
    """Bytes as token ids (utf-8), plus one special stop token."""

    name = "scripted"

    def __init__(self, reply: bytes, ctx: int = 4096, stop_after: bool = True):
        self.fmt, self.model_name, self.context_length = CHATML, "scripted", ctx
        self.reply, self.stop_after = list(reply), stop_after

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_id(self, token):
        return STOP_ID if token == "<|im_end|>" else None

    def info(self):
        return {}

    def _generate(self, prompt_ids, params, max_new):
        seq = self.reply + ([STOP_ID] if self.stop_after else [])
        yield from seq[:max_new]


def run(be, **kw):
    return list(be.stream_prompt("hi", SamplingParams(**kw)))


def test_deltas_join_to_the_text_and_never_split_a_character():
    be = Scripted("héllo wörld ✓".encode())
    chunks = run(be)
    assert "".join(c.text for c in chunks) == "héllo wörld ✓"
    assert all("\ufffd" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stats.completion_tokens == len("héllo wörld ✓".encode())


def test_length_finish_when_max_tokens_reached():
    res = join(Scripted(b"abcdefgh").stream_prompt("x", SamplingParams(max_tokens=3)), "m")
    assert (res.text, res.finish_reason, res.completion_tokens) == ("abc", "length", 3)


def test_stop_string_is_cut_and_never_printed():
    res = join(Scripted(b"one two ### three").stream_prompt("x", SamplingParams(stop=["###"])), "m")
    assert res.text == "one two " and res.finish_reason == "stop"


def test_partial_stop_string_is_released_when_it_was_not_a_stop():
    res = join(Scripted(b"a #b ##").stream_prompt("x", SamplingParams(stop=["###"])), "m")
    assert res.text == "a #b ##"


def test_prompt_longer_than_context_names_both_lengths():
    with pytest.raises(ContextLengthError, match=r"prompt is 50 tokens.*context is 10"):
        Scripted(b"x", ctx=10).stream_prompt("y" * 50, SamplingParams())


def test_generation_never_runs_past_the_context():
    res = join(Scripted(b"abcdefghij", ctx=8, stop_after=False).stream_prompt("hello", SamplingParams(max_tokens=100)), "m")
    assert res.completion_tokens == 3 and res.finish_reason == "length"


def test_closing_the_stream_stops_generation():
    be = Scripted(b"a" * 100)
    s = be.stream_prompt("x", SamplingParams())
    next(s)
    s.close()  # must not raise; the backend generator is closed in `finally`


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_bad_sampling_params_are_clear_errors(bad):
    with pytest.raises(PhikitError):
        SamplingParams(**bad).validate()


def test_stop_strings_hold_back_only_possible_prefixes():
    g = StopStrings(["</s>"])
    assert g.feed("ab<") == ("ab", False)
    assert g.feed("/x") == ("</x", False)
    assert g.feed("</s>tail") == ("", True)


def test_incremental_detokenizer_waits_for_whole_characters():
    d = IncrementalDetokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    e = "é".encode()
    assert d.add(e[0]) == ""
    assert d.add(e[1]) == "é"


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text a stream must show: everything before the earliest point where a whole stop string has appeared."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        return text, False
    end = min(ends)
    start = min(text.find(s) for s in stops if s in text[:end] and text.find(s) + len(s) == end)
    return text[:start], True


def test_stop_strings_match_a_reference_on_random_text_in_random_pieces():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab</s>") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab</s>") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        g, shown, hit, i = StopStrings(stops), "", False, 0
        while i < len(text) and not hit:
            n = rng.randint(1, 4)
            out, hit = g.feed(text[i : i + n])
            shown, i = shown + out, i + n
            # Nothing is held back that cannot start a stop string.
            assert not g.pending or any(s.startswith(g.pending[-k:]) for s in stops for k in range(1, len(g.pending) + 1))
        if not hit:
            shown += g.flush()
        assert (shown, hit) == _reference_cut(text, stops), (text, stops)


@pytest.mark.timeout(30)
def test_stop_string_check_is_linear_in_the_stop_length():
    # The longest stop a request may give, fed character by character with a near miss at every step: testing every
    # prefix on every token took minutes here; the matcher takes a fraction of a second.
    from phikit.engine.types import MAX_STOP_CHARS

    g, shown = StopStrings(["a" * (MAX_STOP_CHARS - 1) + "b"]), ""
    for _ in range(20_000):
        out, hit = g.feed("a")
        shown += out
        assert not hit
    out, hit = g.feed("b")
    assert (shown + out, hit) == ("a" * (20_000 - MAX_STOP_CHARS + 1), True)


@pytest.mark.parametrize("stop", [["x"] * 5, ["y" * 2000], [3]])
def test_stop_strings_are_bounded_in_count_length_and_type(stop):
    with pytest.raises(PhikitError, match="stop"):
        SamplingParams(stop=stop).validate()


def test_llamacpp_decode_is_what_llama_cpp_detokenizes(default_model):
    """The cached pieces give llama.cpp's own detokenisation: special tokens dropped, a space after BOS too,
    characters split across tokens replaced alike; over random ids and real text."""
    import random

    be = default_model.backend
    rng = random.Random(0)
    bos = be.llm.token_bos()
    seqs = [be.encode(t) for t in ("Hello world, héllo ✓ 😀", " a leading space", "\n\nnew\tlines")]
    seqs += [[rng.randrange(be.vocab_size) for _ in range(rng.randrange(1, 12))] for _ in range(2000)]
    seqs += [[bos, *s] for s in seqs[:100]] + [[bos, *be.encode(" spaced")]]
    for s in seqs:
        assert be.decode(s) == be.llm.detokenize(s, special=False).decode("utf-8", errors="replace"), s
