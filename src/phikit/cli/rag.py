"""phikit rag index|ask|search|ls|rm: answers from your own documents, with sources."""

from __future__ import annotations

import json
import sys

from .common import add_model_args, add_sampling_args, load_from_args, params_from_args

STORE_HELP = "store: a folder, qdrant://HOST:PORT/COLLECTION or qdrant-local://DIR/COLLECTION"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="rag_cmd", metavar="COMMAND")
    sub.required = True
    ix = sub.add_parser("index", help="ingest .txt/.md/.html/.pdf files and folders into a store")
    ix.add_argument("paths", nargs="+", metavar="PATH")
    ix.add_argument("--store", required=True, help=STORE_HELP)
    ix.add_argument("--embedder", default=None, help="sentence-transformers model name or path (default: the embedded MiniLM-L6; a store keeps the one it was built with)")
    ix.add_argument("--chunk-size", type=int, default=None, help="characters per chunk for a new store (default 800)")
    ix.add_argument("--overlap", type=int, default=None, help="characters carried between chunks for a new store (default 150)")
    ix.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    ix.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    for name, helptext in (("ask", "answer a question from the store, citing sources"), ("search", "retrieve the best chunks, no generation")):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("question", help="the question ('-' reads standard input)")
        sp.add_argument("--store", required=True, help=STORE_HELP)
        sp.add_argument("--k", type=int, default=4, help="chunks to retrieve (default 4)")
        sp.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid", help="hybrid = dense + BM25 fused by reciprocal rank")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "ask":
            sp.add_argument("--min-score", type=float, default=None,
                            help="abstain without asking the model when no chunk reaches this cosine similarity (default 0.3; 0 = off)")
            add_model_args(sp)
            add_sampling_args(sp, max_tokens=256)

    ls = sub.add_parser("ls", help="list the documents in a store")
    ls.add_argument("--store", required=True, help=STORE_HELP)
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="remove documents (a file, or every file under a folder) from a store")
    rm.add_argument("sources", nargs="+", metavar="SOURCE")
    rm.add_argument("--store", required=True, help=STORE_HELP)


def run(args) -> int:
    return {"index": _index, "ask": _ask, "search": _search, "ls": _ls, "rm": _rm}[args.rag_cmd](args)


def _question(args) -> str:
    return sys.stdin.read().strip() if args.question == "-" else args.question


def _index(args) -> int:
    from ..rag import index_paths, open_store
    from ..rag.readers import check_paths

    check_paths(args.paths)  # a bad PATH fails before a new store folder is created
    store = open_store(args.store, create=True)
    s = index_paths(store, args.paths, args.embedder, progress=not args.quiet, chunk_size=args.chunk_size, overlap=args.overlap)
    if args.json:
        print(json.dumps(s.to_dict(), ensure_ascii=False))
    else:
        print(f"{len(s.added)} added, {len(s.updated)} updated, {len(s.unchanged)} unchanged, {len(s.removed)} removed, "
              f"{len(s.skipped)} skipped; {s.chunks_embedded} chunks embedded ({s.chunks_per_s:.1f} chunks/s); "
              f"{store.count()} chunks in {store!r}")
        for p, why in s.skipped:
            print(f"  warning: skipped {p}: {why}")
        for p, note in s.notes:
            print(f"  note {p}: {note}")
    return 1 if s.skipped and not (s.added or s.updated or s.unchanged) else 0


def _print_sources(hits) -> None:
    import os

    print("\nSources:")
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())
        snippet = snippet[:160] + ("..." if len(snippet) > 160 else "")
        print(f"  [{i}] {os.path.basename(h.source)} (chunk {h.chunk_id}, score {h.score:.3f}) {h.source}\n      {snippet}")


def _ask(args) -> int:
    from ..grounding import ABSTAIN, is_abstention
    from ..rag import RAG, Answer
    from ..rag.rag import MIN_SCORE

    params = params_from_args(args)  # validate options before any loading
    rag = RAG(args.store, k=args.k, mode=args.mode, min_score=MIN_SCORE if args.min_score is None else args.min_score)
    question = _question(args)
    hits = rag.retrieve(question)
    if rag.gate(hits):
        ans = Answer(ABSTAIN, True, hits, gated=True)
        if args.json:
            print(json.dumps(ans.to_dict(), ensure_ascii=False))
        else:
            print(ABSTAIN)
            print("(no retrieved chunk is relevant enough; the model was not asked)", file=sys.stderr)
        return 0
    rag._model = load_from_args(args)
    stream = rag.stream(question, hits, params)
    parts = []
    try:
        for chunk in stream:
            parts.append(chunk.text)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    finally:
        stream.close()
    text = "".join(parts).strip()
    if args.json:
        print(json.dumps(Answer(text, is_abstention(text), hits).to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        _print_sources(hits)
    return 0


def _search(args) -> int:
    from ..rag import RAG

    hits = RAG(args.store, k=args.k, mode=args.mode).retrieve(_question(args))
    if args.json:
        print(json.dumps({"query": args.question, "mode": args.mode, "results": [h.to_dict() for h in hits]}, ensure_ascii=False))
    else:
        _print_sources(hits)
    return 0


def _ls(args) -> int:
    from ..rag import open_store

    store = open_store(args.store)
    docs = store.documents()
    meta = store.meta
    if args.json:
        print(json.dumps({"meta": vars(meta) if meta else None, "documents": [vars(d) for d in docs]}, ensure_ascii=False))
        return 0
    if meta:
        print(f"{store!r}: {len(docs)} documents, {store.count()} chunks; embedder {meta.embedder} ({meta.dim} dims), "
              f"chunks of {meta.chunk_size} chars, overlap {meta.overlap}")
    for d in docs:
        print(f"  {d.n_chunks:5d} chunks  {d.indexed_at}  {d.source}")
    return 0


def _rm(args) -> int:
    from ..rag import open_store, remove

    store = open_store(args.store)
    for s in remove(store, args.sources):
        print(f"removed {s}")
    return 0
