"""A generated 4-class topic-classification set (world / sports / business / science), written as TSV.

Each text is 10–18 words: 1–2 words from its topic's lexicon, 1–3 words shared by two topics
("market" is business and world, "record" sports and business, ...) and filler words common to
all. 8% of the training labels are flipped (the test labels are clean), so a model that fits the
training set perfectly does not reach 100% on the test set. Deterministic in ``seed``; no download.

    python benchmarks/topics_data.py OUT_DIR [--train 4000] [--test 1000]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

LABELS = ("world", "sports", "business", "science")
LEXICON = {
    "world": "election minister parliament embassy treaty border refugees president summit diplomat protest "
             "ceasefire sanctions capital province governor coalition vote referendum army".split(),
    "sports": "match goal coach league season striker tournament championship stadium playoff referee "
              "midfielder injury final squad medal sprint innings quarterback rally".split(),
    "business": "shares profit earnings merger investors revenue quarterly dividend startup acquisition "
                "retail bank inflation stocks ceo bonds exports tariff layoffs forecast".split(),
    "science": "researchers telescope genome species experiment physics molecule vaccine climate orbit "
               "fossil laboratory neurons quantum satellite enzyme galaxy study protein astronomers".split(),
}
SHARED = {  # words that belong to two topics
    ("world", "business"): "market trade oil deal crisis".split(),
    ("sports", "business"): "record contract sponsor transfer billion".split(),
    ("science", "business"): "technology energy patent data chips".split(),
    ("world", "science"): "space health agency report nuclear".split(),
    ("sports", "world"): "olympic team national rival victory".split(),
}
FILLER = ("the a on after before with for and in of today new officials said last week more than while "
          "its their this that over amid as")
FILLER_WORDS = FILLER.split()


def make_rows(n: int, seed: int, flip: float) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(LEXICON[label], rng.randint(1, 2))
        pairs = [w for pair, ws in SHARED.items() if label in pair for w in ws]
        words += rng.sample(pairs, rng.randint(1, 3))
        words += [rng.choice(FILLER_WORDS) for _ in range(rng.randint(10, 18) - len(words))]
        rng.shuffle(words)
        if rng.random() < flip:
            label = rng.choice([x for x in LABELS if x != label])
        rows.append((" ".join(words), label))
    return rows


def write(out: Path, n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, n, s, flip in (("train.tsv", n_train, seed, 0.08), ("test.tsv", n_test, seed + 1, 0.0)):
        (out / name).write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in make_rows(n, s, flip)))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=1000)
    a = ap.parse_args()
    print(write(a.out, a.train, a.test))
