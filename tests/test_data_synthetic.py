import random

import pytest

from jaxalign.data import normalize_rows
from jaxalign.data.rows import Row
from jaxalign.data.synthetic import (
    addition_problems,
    exact_match,
    make_addition_rows,
    make_kto_rows,
    make_preference_rows,
    make_prompt_rows,
    near_miss,
)
from jaxalign.errors import ConfigError


def test_addition_rows_are_deterministic_and_correct():
    rows = make_addition_rows(50, seed=3, digits=(2, 4))
    assert rows == make_addition_rows(50, seed=3, digits=(2, 4))
    assert rows != make_addition_rows(50, seed=4, digits=(2, 4))
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        a, b = user["content"].rstrip("=").split("+")
        assert 2 <= len(a) <= 4 and 2 <= len(b) <= 4 and not a.startswith("0")
        assert assistant["content"] == row["solution"] == str(int(a) + int(b))
    assert len({r["messages"][0]["content"] for r in rows}) == 50


def test_exclude_and_digits_limits():
    first = addition_problems(40, seed=0, digits=1)
    more = addition_problems(40, seed=1, digits=1, exclude=[p for p, _ in first])
    assert not {p for p, _ in first} & {p for p, _ in more}
    with pytest.raises(ConfigError, match="distinct"):
        addition_problems(101, seed=0, digits=1)  # only 100 one-digit problems exist
    with pytest.raises(ConfigError, match="digits"):
        addition_problems(1, seed=0, digits=(3, 2))


def test_near_miss_is_one_digit_off():
    rng = random.Random(0)
    for answer in ["0", "7", "10", "357", "1000"]:
        for _ in range(20):
            miss = near_miss(answer, rng)
            assert len(miss) == len(answer) and miss != answer
            assert sum(x != y for x, y in zip(miss, answer)) == 1
            assert len(miss) == 1 or miss[0] != "0"


def test_preference_kto_prompt_rows_validate():
    pref = make_preference_rows(20, seed=5)
    assert pref == make_preference_rows(20, seed=5)
    for row in pref:
        assert row["rejected_response"] != row["solution"] == row["messages"][-1]["content"]
    kto = make_kto_rows(10, seed=5)
    assert [r["label"] for r in kto] == [True, False] * 5
    assert all((r["messages"][-1]["content"] == r["solution"]) == r["label"] for r in kto)
    prompts = make_prompt_rows(10, seed=5, system="add")
    assert prompts[0]["messages"][0] == {"role": "system", "content": "add"}
    assert [m["role"] for m in prompts[0]["messages"]] == ["system", "user"]
    for rows, task in [(pref, "dpo"), (kto, "kto"), (prompts, "grpo"), (make_addition_rows(5, seed=1), "sft")]:
        examples, bad = normalize_rows([Row(r, "syn", i) for i, r in enumerate(rows)], task)
        assert bad == 0 and len(examples) == len(rows)


def test_exact_match():
    assert exact_match("357", "357")
    assert exact_match(" 357\n", "357")
    assert exact_match("357<|im_end|>", "357")
    assert exact_match("<think>7+5=12</think><answer>357</answer>", "357")
    assert not exact_match("358", "357")
    assert not exact_match("3570", "357")
    assert not exact_match("", "357")
    assert not exact_match("<answer>35</answer>", "357")
