"""Local BM25 retriever over the example corpus (rank-bm25), standing in for Search-R1's search server.

    PYTHONPATH=examples/search_r1_lite python -c "from retriever import search; print(search('capital of France'))"
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from rank_bm25 import BM25Okapi

CORPUS_PATH = Path(__file__).with_name("corpus.jsonl")
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=4)
def _index(path: str) -> tuple[list[dict], BM25Okapi]:
    docs = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON ({e})") from e
        if "text" not in doc:
            raise ValueError(f"{path}:{line_no}: a document needs a 'text' field")
        docs.append(doc)
    if not docs:
        raise ValueError(f"{path}: empty corpus")
    return docs, BM25Okapi([tokenize(f"{d.get('title', '')} {d['text']}") for d in docs])


def search(query: str, topk: int = 3, corpus_path: str | Path = CORPUS_PATH) -> list[dict]:
    """The `topk` best documents for the query (highest BM25 score first); none for an empty query."""
    terms = tokenize(query)
    if not terms:
        return []
    docs, bm25 = _index(str(corpus_path))
    scores = bm25.get_scores(terms)
    best = sorted(range(len(docs)), key=lambda i: -scores[i])[:topk]
    return [docs[i] for i in best if scores[i] > 0]


def format_passages(docs: list[dict]) -> str:
    return "\n".join(f"Doc {i + 1}(Title: {d.get('title', '')}) {d['text']}" for i, d in enumerate(docs))
