"""chat.Reply: one accumulator for streams of Chunks and ToolEvents (the CLI, collect, the server's routes)."""

from phikit.chat import Reply, ToolEvent, collect
from phikit.engine.types import Chunk, Logprob, Stats
from phikit.tools import ToolCall, ToolResult


def _stream():
    run = ToolEvent(ToolCall("calculator", {"expression": "2+2"}), ToolResult("calculator", value=4), 0)
    pending = ToolEvent(ToolCall("lookup", {"q": "x"}), None, 1)
    lp = Logprob(5, b"ok", -0.25, [])
    return [Chunk(text="Let me "), Chunk(text="check."), run, Chunk(text="It is "), pending,
            Chunk(text="4", logprobs=[lp]), Chunk(text=".", finish_reason="tool_calls", stats=Stats(prompt_tokens=7, completion_tokens=3))], run, pending, lp


def test_reply_keeps_the_text_after_the_last_call_and_the_calls_in_order():
    items, run, pending, lp = _stream()
    reply = Reply()
    deltas = [reply.feed(i) for i in items]  # what each item adds, for callers that print or frame it
    assert [d.text for d in deltas] == ["Let me ", "check.", "", "It is ", "", "4", "."]
    assert [d.call for d in deltas] == [None, None, run, None, pending, None, None]
    assert [d.client_call for d in deltas] == [None, None, None, None, pending, None, None]  # the loop ran `run`
    assert [d.logprobs for d in deltas][5] == [lp] and [d.done for d in deltas] == [None] * 6 + [items[-1]]
    assert reply.text == "4."  # text before a call belonged to that call's turn
    assert reply.events == [run, pending] and reply.calls == [pending]  # calls: only those the caller must run
    assert reply.finish_reason == "tool_calls" and reply.stats.prompt_tokens == 7 and reply.last is items[-1]
    assert reply.logprobs == [lp]
    r = reply.result("m")
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.model) == ("4.", "tool_calls", 7, 3, "m")
    assert [c["name"] for c in r.extra["tool_calls"]] == ["calculator", "lookup"]
    assert collect(iter(items), "m") == r


def test_an_empty_reply():
    reply = Reply()
    assert (reply.text, reply.calls, reply.finish_reason, reply.last) == ("", [], None, None)
    assert reply.result("m").finish_reason == "stop"
