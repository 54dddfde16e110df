"""The demo task: multi-digit addition ("12+345=" -> "357"), checkable exactly.

Rows come in ms-swift's formats (``messages`` plus a ``solution`` column; preference rows add
``rejected_response``, a near miss one digit off; KTO rows a boolean ``label``) and are a
pure function of the seed. SFT rows can come from a sloppy teacher (``carry_slip``) that forgets
the carry out of the units column, so that the SFT model learns a systematic error that a
verifiable reward can correct.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from jaxalign.errors import ConfigError
from jaxalign.rewards.exact_match import exact_match, extract_answer  # noqa: F401 - the demo's answer check

Digits = int | tuple[int, int]


def _digit_range(digits: Digits) -> tuple[int, int]:
    lo, hi = (1, digits) if isinstance(digits, int) else (int(digits[0]), int(digits[1]))
    if not 1 <= lo <= hi:
        raise ConfigError(f"digits {digits!r}: give a maximum >= 1 or a (min, max) pair with 1 <= min <= max")
    return lo, hi


def _operand(rng: random.Random, lo: int, hi: int) -> int:
    d = rng.randint(lo, hi)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def addition_problems(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` pairs such as ``("12+345=", "357")``, none in ``exclude``."""
    lo, hi = _digit_range(digits)
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ConfigError(f"cannot make {n} distinct addition problems with digits={digits!r}; allow more digits")
        a, b = _operand(rng, lo, hi), _operand(rng, lo, hi)
        prompt = f"{a}+{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, str(a + b)))
    return out


def near_miss(answer: str, rng: random.Random) -> str:
    """``answer`` with one digit changed (never a leading zero), e.g. "357" -> "337"."""
    pos = rng.randrange(len(answer))
    low = 1 if pos == 0 and len(answer) > 1 else 0
    choices = [str(d) for d in range(low, 10) if str(d) != answer[pos]]
    return answer[:pos] + rng.choice(choices) + answer[pos + 1 :]


def operands(prompt: str) -> tuple[int, int]:
    """``"47+38="`` -> ``(47, 38)``."""
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def carries(prompt: str) -> bool:
    """True when the units column of ``a+b`` carries (``47+38``: 7 + 8 >= 10)."""
    a, b = operands(prompt)
    return a % 10 + b % 10 >= 10


def forgot_carry(prompt: str) -> str:
    """The answer with the units carry forgotten: ``"47+38="`` -> ``"75"``, ``"7+8="`` -> ``"5"``."""
    a, b = operands(prompt)
    return str(a + b - 10 if carries(prompt) else a + b)


def _conversation(prompt: str, answer: str | None, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def make_addition_rows(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = (), system: str | None = None,
    carry_slip: float = 0.0, stray_space: float = 0.0,
) -> list[dict[str, Any]]:
    """SFT rows: ``{"messages": [user "a+b=", assistant "sum"], "solution": "sum"}``.

    With ``carry_slip`` > 0 the assistant turn comes from a sloppy teacher: on each sum whose units
    column carries, it writes :func:`forgot_carry`'s answer with that probability ("47+38=" -> "75");
    ``solution`` stays the true sum. With ``stray_space`` > 0 the teacher also ends that fraction of its
    answers with a space ("85 "), which the answer check ignores (:func:`has_stray_space`).
    """
    for name, value in (("carry_slip", carry_slip), ("stray_space", stray_space)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} {value!r}: give a probability between 0 and 1")
    rng = random.Random(seed + 3_000_003)
    space_rng = random.Random(seed + 4_000_003)
    rows = []
    for p, a in addition_problems(n, seed=seed, digits=digits, exclude=exclude):
        said = forgot_carry(p) if carries(p) and rng.random() < carry_slip else a
        if space_rng.random() < stray_space:
            said += " "
        rows.append({"messages": _conversation(p, said, system), "solution": a})
    return rows


def has_stray_space(completion: str) -> bool:
    """True when a completion ends with whitespace after its answer ("85 ")."""
    return completion != completion.rstrip()


def make_prompt_rows(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = (), system: str | None = None
) -> list[dict[str, Any]]:
    """GRPO/PPO rows: the user prompt only, with the answer in ``solution``."""
    return [
        {"messages": _conversation(p, None, system), "solution": a}
        for p, a in addition_problems(n, seed=seed, digits=digits, exclude=exclude)
    ]


def make_preference_rows(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = (), system: str | None = None
) -> list[dict[str, Any]]:
    """DPO/RM rows: chosen = the correct sum, ``rejected_response`` = a near miss."""
    rng = random.Random(seed + 1_000_003)
    return [
        {"messages": _conversation(p, a, system), "rejected_response": near_miss(a, rng), "solution": a}
        for p, a in addition_problems(n, seed=seed, digits=digits, exclude=exclude)
    ]


def make_style_pairs(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = (), system: str | None = None
) -> list[dict[str, Any]]:
    """Reward-model rows for a labeler who dislikes the stray space: chosen = the correct sum, rejected =
    the same sum with a trailing space (``"85"`` over ``"85 "``)."""
    return [
        {"messages": _conversation(p, a, system), "rejected_response": a + " ", "solution": a}
        for p, a in addition_problems(n, seed=seed, digits=digits, exclude=exclude)
    ]


def make_kto_rows(
    n: int, *, seed: int, digits: Digits = (1, 3), exclude: Iterable[str] = (), system: str | None = None
) -> list[dict[str, Any]]:
    """KTO rows: alternately the correct sum (``label`` true) and a near miss (false)."""
    rng = random.Random(seed + 2_000_003)
    rows = []
    for i, (p, a) in enumerate(addition_problems(n, seed=seed, digits=digits, exclude=exclude)):
        good = i % 2 == 0
        reply = a if good else near_miss(a, rng)
        rows.append({"messages": _conversation(p, reply, system), "label": good, "solution": a})
    return rows
