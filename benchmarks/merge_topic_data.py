"""Generate the second classification task of the merge benchmark: sentence topic (4 classes).

Sentences are built from templates with topic words (sport, food, computing, weather) mixed with
neutral filler; about a quarter of the sentences also carry a distractor word of another topic, so
the task needs more than a keyword lookup. Deterministic (``--seed``); no download.

    python benchmarks/merge_topic_data.py --output out/topic   # writes train.tsv and validation.tsv
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

TOPICS: dict[str, list[str]] = {
    "sport": ["the match", "the striker", "a penalty", "the coach", "the league", "the goalkeeper", "the final whistle",
              "the marathon", "a tennis serve", "the relay team", "the referee", "the stadium crowd"],
    "food": ["the soup", "a fresh loaf", "the chef", "the recipe", "the spices", "the dessert", "a bowl of noodles",
             "the roasted vegetables", "the bakery", "the sauce", "the tasting menu", "a ripe mango"],
    "computing": ["the compiler", "the server", "a memory leak", "the database", "the new laptop", "the kernel",
                  "the software update", "the network cable", "the algorithm", "a broken keyboard", "the cloud backup",
                  "the source code"],
    "weather": ["the storm", "the forecast", "a heavy frost", "the humidity", "the thunder", "the morning fog",
                "the heatwave", "a cold front", "the rain", "the snowfall", "the wind gusts", "a clear sky"],
}
VERBS = ["surprised", "annoyed", "delighted", "worried", "impressed", "bored", "confused", "excited"]
PEOPLE = ["my neighbour", "everyone", "the children", "our team", "my sister", "the visitors", "nobody", "the old man"]
TEMPLATES = [
    "{a} {verb} {who} yesterday.",
    "honestly, {a} {verb} {who} more than {b} did.",
    "{who} talked about {a} all evening.",
    "i cannot stop thinking about {a} and {b}.",
    "it was {a} that {verb} {who} this week.",
    "{who} said {a} was the only thing worth mentioning.",
    "after lunch, {a} {verb} {who}.",
    "we argued about {a} while {d} was on the news.",
]


def sentence(rng: random.Random, topic: str) -> str:
    words = TOPICS[topic]
    a, b = rng.sample(words, 2)
    other = rng.choice([t for t in TOPICS if t != topic])
    d = rng.choice(TOPICS[other]) if rng.random() < 0.25 else rng.choice(PEOPLE)
    text = rng.choice(TEMPLATES).format(a=a, b=b, d=d, verb=rng.choice(VERBS), who=rng.choice(PEOPLE))
    return text[0].upper() + text[1:]


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="out/topic")
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--validation", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    topics = sorted(TOPICS)
    rows = [(sentence(rng, t), t) for t in (rng.choice(topics) for _ in range(a.train + a.validation))]
    write(Path(a.output) / "train.tsv", rows[: a.train])
    write(Path(a.output) / "validation.tsv", rows[a.train:])
    print(f"wrote {a.train} + {a.validation} rows to {a.output}")


if __name__ == "__main__":
    main()
