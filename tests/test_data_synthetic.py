import random

import pytest

from jaxalign.data import normalize_rows
from jaxalign.data.rows import Row
from jaxalign.demo.synthetic import (
    addition_problems,
    carries,
    exact_match,
    forgot_carry,
    has_stray_space,
    make_addition_rows,
    make_kto_rows,
    make_preference_rows,
    make_prompt_rows,
    make_style_pairs,
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


def test_forgot_carry_by_hand():
    assert carries("47+38=") and forgot_carry("47+38=") == "75"  # 85 with the units carry forgotten
    assert carries("7+8=") and forgot_carry("7+8=") == "5"  # 15
    assert carries("67+58=") and forgot_carry("67+58=") == "115"  # 125: only the units carry is lost
    assert carries("95+7=") and forgot_carry("95+7=") == "92"  # 102
    assert carries("5+5=") and forgot_carry("5+5=") == "0"  # 10
    assert not carries("41+38=") and forgot_carry("41+38=") == "79"
    assert not carries("0+0=") and forgot_carry("0+0=") == "0"


def test_sloppy_teacher_forgets_the_carry_at_its_rate():
    clean = make_addition_rows(4000, seed=1, digits=(1, 2))
    sloppy = make_addition_rows(4000, seed=1, digits=(1, 2), carry_slip=0.7)
    assert sloppy == make_addition_rows(4000, seed=1, digits=(1, 2), carry_slip=0.7)
    assert [r["solution"] for r in sloppy] == [r["solution"] for r in clean]  # same problems, true solutions
    n_carry = n_slip = 0
    for row in sloppy:
        a, b = map(int, row["messages"][0]["content"].rstrip("=").split("+"))
        said = int(row["messages"][1]["content"])
        if a % 10 + b % 10 < 10:
            assert said == a + b  # no carry, nothing to forget
            continue
        n_carry += 1
        assert said in (a + b, a + b - 10)
        n_slip += said == a + b - 10
    # Binomial(n_carry, 0.7): 5 standard deviations either side.
    sd = (n_carry * 0.7 * 0.3) ** 0.5
    assert n_carry > 1000 and abs(n_slip - 0.7 * n_carry) < 5 * sd
    assert all(r["messages"][1]["content"] == r["solution"] for r in make_addition_rows(300, seed=1, carry_slip=0.0))
    assert all(r["messages"][1]["content"] == str(int(r["solution"]) - 10) for r in
               make_addition_rows(300, seed=1, carry_slip=1.0) if carries(r["messages"][0]["content"]))
    with pytest.raises(ConfigError, match="carry_slip"):
        make_addition_rows(3, seed=1, carry_slip=1.5)


def test_teacher_stray_space_at_its_rate_and_independent_of_the_slip():
    plain = make_addition_rows(4000, seed=2, digits=(1, 2), carry_slip=0.7)
    spaced = make_addition_rows(4000, seed=2, digits=(1, 2), carry_slip=0.7, stray_space=0.6)
    said_plain = [r["messages"][1]["content"] for r in plain]
    said = [r["messages"][1]["content"] for r in spaced]
    # The same answers (slips included), some with one trailing space: the space draws its own random numbers.
    assert [s.rstrip() for s in said] == said_plain
    assert all(s in (p, p + " ") for s, p in zip(said, said_plain))
    n = sum(s.endswith(" ") for s in said)
    assert abs(n - 0.6 * 4000) < 5 * (4000 * 0.6 * 0.4) ** 0.5  # Binomial(4000, 0.6), 5 standard deviations
    assert all(exact_match(s, r["solution"]) for s, r in zip(said, spaced) if s.rstrip() == r["solution"])
    assert not any(r["messages"][1]["content"].endswith(" ") for r in make_addition_rows(300, seed=2))
    with pytest.raises(ConfigError, match="stray_space"):
        make_addition_rows(3, seed=1, stray_space=-0.1)


def test_has_stray_space():
    assert has_stray_space("85 ") and has_stray_space("85\n") and has_stray_space(" ")
    assert not has_stray_space("85") and not has_stray_space(" 85") and not has_stray_space("")


def test_style_pairs_differ_only_by_the_trailing_space():
    pairs = make_style_pairs(30, seed=7, digits=(1, 2))
    assert pairs == make_style_pairs(30, seed=7, digits=(1, 2))
    for row in pairs:
        a, b = map(int, row["messages"][0]["content"].rstrip("=").split("+"))
        assert row["messages"][-1]["content"] == row["solution"] == str(a + b)
        assert row["rejected_response"] == row["solution"] + " "
    examples, bad = normalize_rows([Row(r, "syn", i) for i, r in enumerate(pairs)], "rm")
    assert bad == 0 and len(examples) == 30


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
