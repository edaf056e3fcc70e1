"""Surprisal per word of a short story, as a reading-time study uses it: a CSV and a plot.

    python examples/word_surprisal.py [--base-url http://127.0.0.1:8000/v1] \
        [--csv surprisal.csv] [--plot surprisal.png]

The words are the story's runs of non-whitespace characters (punctuation stays attached, as in
the Natural Stories or Provo corpora). Each word's probability is corrected for the space that
tokens carry in front of a word (`word_probability: "corrected"`, the default; see
docs/words.md): surprisal in bits is `-logprob / ln 2`. The CSV also has the plain sum of the
word's tokens, as earlier studies computed it, to compare.
"""

import csv
import math

from _common import connect

client, model, args = connect(__doc__, {"--csv": "surprisal.csv", "--plot": "surprisal.png"})
STORY = (
    "Tulips grew in the old garden behind the mill. Every spring the miller's daughter "
    "counted them, and every spring there were more. One morning she found a single black "
    "tulip among the red ones, and she told nobody."
)

response = client.completions.create(
    model=model, prompt=STORY, max_tokens=0,
    extra_body={"loglikelihood": {"words": True, "content": False}},
)  # fmt: skip
(entry,) = response.choices[0].model_extra["loglikelihood"]
rows = [
    {
        "word": w["text"],
        "offset": w["offset"],
        "surprisal_bits": -w["logprob"] / math.log(2),
        "tokens_surprisal_bits": -w["tokens_logprob"] / math.log(2),
        "num_tokens": w["num_tokens"],
    }
    for w in entry["words"]
]
if entry["words_left_out"]:
    print(f"{entry['words_left_out']} word left out: the prompt's first token has no logprob")

path = args.csv
with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"{len(rows)} words written to {path}")
for row in sorted(rows, key=lambda r: r["surprisal_bits"], reverse=True)[:3]:
    print(f"most surprising: {row['word']!r} at {row['offset']}: {row['surprisal_bits']:.1f} bits")

import matplotlib  # noqa: E402  (after the scoring: a run without a display needs no backend)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.3), 3.5))
ax.plot(range(len(rows)), [r["surprisal_bits"] for r in rows], marker="o", label="corrected")
ax.plot(range(len(rows)), [r["tokens_surprisal_bits"] for r in rows], marker=".", alpha=0.5,
        label="sum of tokens")  # fmt: skip
ax.set_xticks(range(len(rows)), [r["word"] for r in rows], rotation=90, fontsize=8)
ax.set_ylabel("surprisal (bits)")
ax.set_title(f"Surprisal per word ({model})")
ax.legend()
fig.tight_layout()
plot = args.plot
fig.savefig(plot, dpi=100)
print(f"plot written to {plot}")
