"""llama.cpp grammars tried in a separate process before the model's own process builds them.

llama.cpp parses a GBNF grammar and walks its rules recursively in C++: a grammar that is too
deep overflows the stack and ends the whole process with a segfault, which no Python code can
catch. `constrain.py` bounds what a schema may ask for (repetition counts, depth, size), but
the converter and llama.cpp have other ways to nest (regex quantifiers, their own expansions),
so every new grammar is first built here, in a child process that loads only the GGUF's
vocabulary: if it crashes, the request that asked for it fails with a clear error and the
server goes on. A grammar that built once is not tried again (cached by its text).

    python -m phikit.engine.grammar_check MODEL.gguf   # one JSON request per line on stdin
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading


class GrammarChecker:
    """One child process per GGUF file, started on first use and again after a crash."""

    def __init__(self, gguf_path: str):
        self.gguf_path = gguf_path
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._ok: set[str] = set()

    def check(self, gbnf: str, root: str = "root") -> str | None:
        """None if llama.cpp builds this grammar (and takes a first sampling step with it) without
        crashing, else the reason (its parse error, or how the child process died)."""
        key = hashlib.sha256(f"{root}\0{gbnf}".encode()).hexdigest()
        if key in self._ok:
            return None
        with self._lock:
            proc = self._start()
            try:
                proc.stdin.write(json.dumps({"gbnf": gbnf, "root": root}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:  # the child died on this grammar
                code = proc.wait()
                self._proc = None
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                return f"llama.cpp crashed while building the grammar ({how})"
        reply = json.loads(line)
        if reply["ok"]:
            self._ok.add(key)
            return None
        return reply["error"]

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "phikit.engine.grammar_check", self.gguf_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
            )
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()  # the child exits at end of input
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    __del__ = close


def _serve(gguf_path: str) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    cands = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, 0.0, 0.0) for i in range(n)])
    for line in sys.stdin:
        req = json.loads(line)
        smpl = llama_cpp.llama_sampler_init_grammar(vocab, req["gbnf"].encode(), req["root"].encode())
        if not smpl:
            reply = {"ok": False, "error": "llama.cpp rejected the grammar (too large or malformed)"}
        else:
            # One sampling step: the grammar's first match against the whole vocabulary, where a
            # deep rule would also recurse.
            arr = llama_cpp.llama_token_data_array(cands, n, -1, False)
            llama_cpp.llama_sampler_apply(smpl, llama_cpp.ctypes.byref(arr))
            llama_cpp.llama_sampler_free(smpl)
            reply = {"ok": True}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
