"""Ragged SFT data for ``macft bench sft --data alpaca-like``: rows whose lengths follow a
distribution like Alpaca's, generated (no download), so that anyone can re-run the packing figure.

Alpaca (52k instruction rows) tokenizes to a median of about 200 tokens per sample, most of them the
response, with a long tail to ~1000. Here a prompt and a completion each take a log-normal number of
words (medians 60 and 130; sigmas 0.5 and 0.8), cut so that the sample stays under ``max_words``;
each word below is one token for the SmolLM2 and Llama tokenizers (a leading space and a common
English word), so a row's token count is close to its word count. The bench prints the lengths
it measured after tokenization.

Write the rows to a file with ``python scripts/alpaca_like_data.py OUT.jsonl``.
"""

import numpy as np

PROMPT_MEDIAN_WORDS, PROMPT_SIGMA = 60, 0.5
COMPLETION_MEDIAN_WORDS, COMPLETION_SIGMA = 130, 0.8

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there one all we their been has when who will more no if out so said what up its "
          "about into than them can only other new some could time these two may then do first any my now such "
          "like our over man me even most made after also did many before must through back years where much your "
          "way well down should because each just those people how too little state good very make world still own "
          "see men work long get here between both life being under never day same another know while last might "
          "us great old year off come since against go came right used take three").split()


def alpaca_like_rows(num_rows: int = 2000, seed: int = 0, max_words: int = 1000) -> list[dict]:
    """``num_rows`` {"prompt", "completion"} rows with Alpaca-like lengths (module docstring)."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(PROMPT_MEDIAN_WORDS), PROMPT_SIGMA, num_rows), 8, max_words // 2)
    completions = np.clip(rng.lognormal(np.log(COMPLETION_MEDIAN_WORDS), COMPLETION_SIGMA, num_rows), 2, None)
    completions = np.minimum(completions, max_words - prompts)
    rows = []
    for i, (p, c) in enumerate(zip(prompts.astype(int), completions.astype(int))):
        words = rng.choice(len(_WORDS), size=p + c)
        text = [_WORDS[w] for w in words]
        rows.append({"prompt": f"Instruction {i}: " + " ".join(text[:p]) + "\nResponse:",
                     "completion": " " + " ".join(text[p:])})
    return rows


def length_summary(lengths) -> dict:
    """Median, 90th percentile, max and mean of the samples' token counts."""
    lengths = np.asarray(lengths)
    return {"samples": int(lengths.size), "median": float(np.median(lengths)),
            "p90": round(float(np.percentile(lengths, 90)), 1), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
