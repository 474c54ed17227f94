"""An offline text-classification set for RAPT: templated topic sentences, generated deterministically.

Source: generated here, not downloaded and not taken from any package. Every sentence is built from the word lists
and templates below with a seeded ``numpy.random.Generator`` (``seed`` argument, :data:`TEXT_SEED` by default), so
the same call gives the same data on every machine.

Four topics (``sports``, ``food``, ``weather``, ``music``). A sentence is a template such as
``"{name} {said} that the {kw} was {adj} {time}"`` filled with a person, a verb of saying, one or two keywords of its
topic, topic-neutral fillers and, with probability :data:`DISTRACTOR_P`, one keyword of another topic (so a
single word is not always decisive). All words are common English words that the CLIP BPE tokenizer keeps as one
token each. Default sizes: 800 training and 400 test sentences, class-balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DISTRACTOR_P", "TEXT_CLASSNAMES", "TEXT_SEED", "TextDataset", "make_text_dataset"]

TEXT_SEED = 4242
DISTRACTOR_P = 0.3
TEXT_CLASSNAMES = ["sports", "food", "weather", "music"]

_KEYWORDS: dict[str, list[str]] = {
    "sports": ["football", "match", "goal", "team", "coach", "player", "score", "tennis", "race", "league", "ball"],
    "food": ["pizza", "soup", "bread", "cheese", "dinner", "recipe", "kitchen", "salad", "cake", "rice", "chef"],
    "weather": ["rain", "storm", "snow", "wind", "cloud", "sunny", "forecast", "cold", "heat", "fog", "thunder"],
    "music": ["song", "guitar", "piano", "concert", "band", "album", "singer", "drum", "melody", "radio", "jazz"],
}
_NAMES = ["anna", "ben", "carla", "david", "emma", "frank", "grace", "henry", "julia", "kevin", "laura", "mark"]
_SAID = ["said", "thinks", "wrote", "told us", "believes", "noticed", "claims", "heard"]
_ADJ = ["great", "strange", "long", "quiet", "terrible", "perfect", "new", "big", "boring", "amazing"]
_TIME = ["today", "yesterday", "last night", "this morning", "again", "on sunday", "all week", "at noon"]
_TEMPLATES = [
    "{name} {said} that the {kw} was {adj} {time}",
    "the {kw} and the {kw2} were {adj} {time}",
    "{name} {said} the {adj} {kw} {time}",
    "{time} the {kw} felt {adj} to {name}",
    "{name} talked about the {kw} and the {kw2} {time}",
    "what a {adj} {kw} {time} said {name}",
    "{name} {said} nothing about the {kw} {time}",
    "everyone near {name} liked the {adj} {kw2}",
]


@dataclass(frozen=True)
class TextDataset:
    """One split of the templated topic set.

    Attributes:
        texts: the sentences.
        labels: (N,) int64 class ids.
        classnames: :data:`TEXT_CLASSNAMES`.
    """

    texts: list[str]
    labels: np.ndarray
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _sentence(rng: np.random.Generator, label: int) -> str:
    topic = TEXT_CLASSNAMES[label]
    kws = _KEYWORDS[topic]
    kw, kw2 = rng.choice(kws, size=2, replace=False)
    if rng.random() < DISTRACTOR_P:  # one keyword of another topic in the second slot
        other = TEXT_CLASSNAMES[int(rng.choice([c for c in range(len(TEXT_CLASSNAMES)) if c != label]))]
        kw2 = rng.choice(_KEYWORDS[other])
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    if "{kw}" not in template:  # the template has only the second slot: keep the topic keyword there
        kw2 = kw
    return template.format(
        name=rng.choice(_NAMES),
        said=rng.choice(_SAID),
        kw=kw,
        kw2=kw2,
        adj=rng.choice(_ADJ),
        time=rng.choice(_TIME),
    )


def make_text_dataset(split: str = "train", *, n: int | None = None, seed: int = TEXT_SEED) -> TextDataset:
    """The ``"train"`` (800 sentences) or ``"test"`` (400) split, class-balanced and shuffled.

    Args:
        split: ``"train"`` or ``"test"`` (different streams of the same generator family, so they never coincide
            by construction of the seed, though a short sentence may occur in both).
        n: number of sentences (default 800 / 400); rounded down to a multiple of the number of classes.
        seed: base seed.

    Returns:
        The split.
    """
    sizes = {"train": 800, "test": 400}
    if split not in sizes:
        raise ValueError(f"split must be one of {tuple(sizes)}, got {split!r}")
    n = sizes[split] if n is None else n
    if n < len(TEXT_CLASSNAMES):
        raise ValueError(f"n must be >= {len(TEXT_CLASSNAMES)} (one sentence per class), got {n}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    per_class = n // len(TEXT_CLASSNAMES)
    labels = np.repeat(np.arange(len(TEXT_CLASSNAMES), dtype=np.int64), per_class)
    rng.shuffle(labels)
    texts = [_sentence(rng, int(y)) for y in labels]
    return TextDataset(texts=texts, labels=labels, classnames=list(TEXT_CLASSNAMES))
