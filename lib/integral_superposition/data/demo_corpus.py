"""A synthetic, deterministic corpus of topic-labelled news-style headlines.

The corpus is generated from per-topic vocabularies and headline templates (the package data
file ``demo_corpus.yaml``), so the main job runs offline. It is synthetic: the headlines are plausible in form, not real news.
"""

from __future__ import annotations

import importlib.resources
import random
from typing import Any

import numpy as np
import pandas as pd
import yaml


def _vocabulary() -> dict[str, Any]:
    """The corpus's data file ``demo_corpus.yaml``: templates, sources, topics, prompts."""
    text = importlib.resources.files(__package__).joinpath("demo_corpus.yaml").read_text("utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


_DATA = _vocabulary()
TOPICS: dict[str, dict[str, list[str]]] = _DATA["topics"]
"""Per topic, the words each template slot (``subject``, ``verb``, ``object``, ``tail``,
``noun``) draws from."""
_TEMPLATES: list[str] = _DATA["templates"]
_SOURCES: list[str] = _DATA["sources"]


MAX_TITLES_PER_TOPIC = 80_000
"""Most distinct headlines :func:`demo_corpus` makes per topic (the vocabulary allows about
92,000; sampling the last ones would take ever longer)."""


def demo_corpus(n: int = 4000, seed: int = 0, topics: list[str] | None = None) -> pd.DataFrame:
    """``n`` distinct synthetic headlines, balanced over topics, with columns ``title`` and ``topic``.

    Deterministic for a given ``(n, seed, topics)``. Eight topics by default; at most
    :data:`MAX_TITLES_PER_TOPIC` (80,000) titles per topic, 640,000 in all: a larger ``n`` is
    refused at once.
    """
    names = list(TOPICS) if topics is None else list(topics)
    unknown = sorted(set(names) - set(TOPICS))
    if unknown:
        raise ValueError(f"topics={unknown}: unknown; expected a subset of {list(TOPICS)}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"n={n!r}: expected an integer number of headlines")
    if n < len(names):
        raise ValueError(f"n={n}: expected at least one headline per topic ({len(names)} topics)")
    limit = MAX_TITLES_PER_TOPIC * len(names)
    if n > limit:
        raise ValueError(
            f"n={n}: the demo corpus has at most {limit} distinct headlines "
            f"({MAX_TITLES_PER_TOPIC} per topic x {len(names)} topics); use a smaller n or a "
            "real dataset"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    per_topic = [n // len(names) + (1 if i < n % len(names) else 0) for i in range(len(names))]
    for topic, count in zip(names, per_topic, strict=True):
        vocab = TOPICS[topic]
        made, attempts = 0, 0
        while made < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(f"n={n}: cannot generate {count} distinct {topic} headlines")
            noun = rng.choice(vocab["noun"])
            title = rng.choice(_TEMPLATES).format(
                subject=rng.choice(vocab["subject"]),
                verb=rng.choice(vocab["verb"]),
                object=rng.choice(vocab["object"]),
                tail=rng.choice(vocab["tail"]),
                noun=noun,
                noun_cap=noun.capitalize(),
                source=rng.choice(_SOURCES),
            )
            if title in seen:
                continue
            seen.add(title)
            rows.append((title, topic))
            made += 1
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["title", "topic"])


def neutral_prompts() -> list[str]:
    """Topic-neutral headline openings, for steering evaluations."""
    return list(_DATA["neutral_prompts"])


def neutral_fit_prompts() -> list[str]:
    """Other topic-neutral headline openings, none of them in :func:`neutral_prompts`: the
    steering classifier learns "no topic" from the model's continuations of these, never from
    continuations of the prompts it evaluates."""
    return list(_DATA["neutral_fit_prompts"])
