# Reward functions file for grpo_config.yaml, written the way mlx-lm-lora's example reward file
# is: functions registered with mlx-lm-lora's decorator, signature
# (prompts, completions, answer, types=None) -> list[float].
# Origin of the pattern: Goekdeniz-Guelmez/mlx-lm-lora, examples/custom_reward_functions.py,
#         commit 288b99df00f85ac383f0216b37e4723caff1a629 (same names and scores; our own code).
from typing import Optional

from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function


def _between(text: str, start: str, end: str) -> str:
    return text.split(start)[-1].split(end)[0].strip()


@register_reward_function()
def exact_match_reward(prompts: list, completions: list, answer: list, types: Optional[list] = None) -> list[float]:
    if not completions or not answer:
        return [0.0] * len(prompts)
    return [2.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answer)]


@register_reward_function()
def custom_tag_match_reward(prompts: list, completions: list, answer: list,
                            types: Optional[list] = None) -> list[float]:
    if not completions or not answer:
        return [0.0] * len(prompts)
    got = [_between(c, "<result>", "</result>") for c in completions]
    return [2.0 if g and a and g.strip() == a.strip() else 0.0 for g, a in zip(got, answer)]


@register_reward_function()
def format_adherence_reward(prompts: list, completions: list, answer: list,
                            types: Optional[list] = None) -> list[float]:
    if not completions:
        return [0.0] * len(prompts)
    scores = []
    for c in completions:
        r0, r1, a0, a1 = (c.find(t) for t in ("<reasoning>", "</reasoning>", "<result>", "</result>"))
        s = 0.0
        s += 0.2 if r0 != -1 else 0.0
        s += 0.2 if r1 != -1 and r0 < r1 else 0.0
        s += 0.2 if a0 != -1 and (r1 == -1 or r1 < a0) else 0.0
        s += 0.2 if a1 != -1 and a0 < a1 else 0.0
        s += 0.2 if a0 != -1 and a1 != -1 and c[a0 + len("<result>"):a1].strip() else 0.0
        scores.append(s if c else 0.0)
    return scores
