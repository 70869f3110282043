"""Writes tiny_corpus.txt: 320 lines of plain prose assembled from hand-written phrases
with a fixed seed, so the file is reproducible and free of third-party text.

    python examples/data/make_tiny_corpus.py
"""

import random
from pathlib import Path

SUBJECTS = [
    "The old lighthouse keeper",
    "A young fisherman",
    "The miller's daughter",
    "A tired traveller",
    "The village schoolteacher",
    "An old grey dog",
    "The baker",
    "A quiet shepherd",
    "The blacksmith's apprentice",
    "A wandering musician",
    "The doctor from the valley",
    "Two small children",
]
ACTIONS = [
    "walked slowly along",
    "sat for a long while beside",
    "sang an old song near",
    "looked for a lost key by",
    "mended a torn net at",
    "waited patiently at",
    "swept the stones in front of",
    "told a long story about",
    "painted a small picture of",
    "carried a basket of apples past",
]
PLACES = [
    "the harbour",
    "the stone bridge",
    "the mill by the river",
    "the edge of the forest",
    "the church on the hill",
    "the market square",
    "the narrow road to the sea",
    "the garden wall",
    "the well behind the inn",
    "the frozen pond",
]
TIMES = [
    "at dawn",
    "before the rain came",
    "on a cold winter morning",
    "late in the evening",
    "while the bells were ringing",
    "in the warm afternoon",
    "when the tide was low",
    "under a clear sky full of stars",
]
ENDINGS = [
    "and nobody said a word.",
    "and the wind carried the smell of salt and bread.",
    "and then went home for supper.",
    "thinking of the summer that had passed.",
    "and counted the boats that had come home.",
    "while the cat watched from the window.",
    "and the whole village seemed to be asleep.",
    "and promised to return the next day.",
    "as the first snow began to fall.",
    "and smiled at the people passing by.",
]
PLAIN = [
    "Every morning the bread was warm and the street smelled of flour.",
    "The river was wide and slow, and the water was the colour of tea.",
    "In winter the lake froze, and the children skated until dark.",
    "The boats went out before sunrise and came back with the evening tide.",
    "Nobody in the village could remember when the bridge was built.",
    "The bells of the church rang twice on Sundays and once on market days.",
    "When the storm was over, everyone went down to the shore to look at the sea.",
    "The inn had six rooms, a long table, and a fire that never went out.",
]


def main() -> None:
    rng = random.Random(0)
    lines = []
    for i in range(320):
        if i % 8 == 7:
            lines.append(rng.choice(PLAIN))
        else:
            parts = [rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES), rng.choice(TIMES)]
            lines.append(" ".join(parts) + " " + rng.choice(ENDINGS))
    out = Path(__file__).with_name("tiny_corpus.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} lines to {out}")


if __name__ == "__main__":
    main()
