"""Reward functions (jaxalign.rewards) on hand-written completions, the registry, plugins and scoring."""

import math
import threading

import numpy as np
import pytest

import jaxalign.rewards as rewards
from jaxalign.errors import ConfigError, DataError, JaxalignError
from jaxalign.rewards import (
    CosineReward,
    RepetitionPenalty,
    SoftOverlong,
    accuracy,
    build_reward_funcs,
    format_reward,
    load_plugins,
    reward_metrics,
    score_completions,
)
from jaxalign.rewards import registry as registry_module


@pytest.fixture(autouse=True)
def _clean_registry():
    """Plugins register globally: restore the registry after each test."""
    saved = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(saved)


# ----------------------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<answer>0.5</answer>", r"\frac{1}{2}", 1.0),  # LaTeX gold, decimal answer in the tag
        (r"The answer is $0.5$", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"Thus \boxed{42}.", "42", 1.0),
        (r"\boxed{41}", "42", 0.0),
        (r"The final answer is $\frac{1}{2}$", r"$\frac{1}{2}$", 1.0),
        (r"The final answer is $\frac{1}{3}$", r"$\frac{1}{2}$", 0.0),
        (r"<think>halve it</think><answer>\frac{2}{4}</answer>", "<answer>0.5</answer>", 1.0),  # tag in gold too
        (r"<answer>\boxed{42}</answer>", "42", 1.0),
        ("<answer>357</answer>", "357", 1.0),  # plain numbers
        ("The answer is 357", "357", 1.0),
        ("The answer is 358", "357", 0.0),
        ("357", 357, 1.0),  # a non-string solution is compared as text
        ("", "357", 0.0),
        ("I don't know", "357", 0.0),
        ("<answer>42</answer>", "not a number", 0.0),  # unparsable gold scores 0 (current ms-swift)
    ],
)
def test_accuracy(completion, solution, expected):
    assert accuracy([completion], solution=[solution]) == [expected]


def test_accuracy_batch_ignores_extra_columns_and_needs_solution():
    completions = [r"\boxed{2}", "<answer>3</answer>"]
    out = accuracy(completions, solution=["2", "4"], prompt=["p", "q"], completion_ids=[[1], [2]])
    assert out == [1.0, 0.0]
    with pytest.raises(DataError, match="solution"):
        accuracy(["<answer>1</answer>"], prompt=["p"])


def test_accuracy_off_the_main_thread():
    """math_verify's signal-based timeout only works on the main thread; ours turns it off elsewhere."""
    out = []
    worker = threading.Thread(target=lambda: out.append(accuracy([r"\boxed{7}"], solution=["7"])))
    worker.start()
    worker.join()
    assert out == [[1.0]]


# ------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reason</think><answer>4</answer>", 1.0),
        ("<think>line 1\nline 2</think>\n\n<answer>\n4\n</answer>", 1.0),  # newlines inside and between
        ("<think></think> <answer></answer>", 1.0),
        ("<answer>4</answer>", 0.0),  # missing think
        ("<think>reason</think>", 0.0),  # missing answer
        ("<think>reason</think><answer>4</answer> extra", 0.0),  # text after
        ("<think>reason</think><answer>4</answer>\n", 0.0),  # even a trailing newline
        ("Sure! <think>reason</think><answer>4</answer>", 0.0),  # text before
        ("\n<think>reason</think><answer>4</answer>", 0.0),
        ("<think>reason</think>text<answer>4</answer>", 0.0),  # text between
        ("<think>reason<answer>4</answer>", 0.0),  # unclosed think
    ],
)
def test_format(completion, expected):
    assert format_reward([completion], solution=["4"]) == [expected]


# ------------------------------------------------------------------------------------------- cosine

# By hand, T = 100: cos(0) = 1, cos(pi/4) = sqrt(2)/2, cos(pi/2) = 0, cos(pi) = -1;
# r = hi - (hi - lo) * (1 - cos) / 2 with (hi, lo) = (1.0, 0.5) correct, (-0.5, 0.0) wrong.
_C = (1 - math.sqrt(2) / 2) / 2  # (1 - cos(pi/4)) / 2 = 0.1464466...


@pytest.mark.parametrize(
    "length, correct, expected",
    [
        (0, True, 1.0),
        (25, True, 1.0 - 0.5 * _C),  # 0.92677...
        (50, True, 0.75),
        (100, True, 0.5),
        (0, False, -0.5),
        (25, False, -0.5 + 0.5 * _C),  # -0.42677...
        (50, False, -0.25),
        (100, False, 0.0),
    ],
)
def test_cosine_by_hand(length, correct, expected):
    reward = CosineReward(cosine_max_len=100)
    completion = r"\boxed{6}" if correct else r"\boxed{5}"
    out = reward([completion], solution=["6"], completion_ids=[[0] * length])
    assert out == [pytest.approx(expected, abs=1e-12)]


def test_cosine_options_and_length_fallbacks():
    # cosine_max_len defaults to max_completion_length; non-default values; length in characters without ids.
    reward = CosineReward(
        cosine_min_len_value_wrong=-1.0,
        cosine_max_len_value_wrong=-0.2,
        cosine_min_len_value_correct=2.0,
        cosine_max_len_value_correct=1.0,
        max_completion_length=18,
    )
    assert reward.max_len == 18
    text = r"\boxed{6} " + "x" * 8  # 18 characters: cos(pi) = -1, so the long-end values
    assert len(text) == 18
    assert reward([text, text], solution=["6", "5"]) == [pytest.approx(1.0), pytest.approx(-0.2)]
    # ms-swift's response_token_ids column works too, and a tokenizer counts when no ids are given
    assert reward([text], solution=["6"], response_token_ids=[[]]) == [pytest.approx(2.0)]
    by_words = CosineReward(cosine_max_len=4, tokenizer=lambda s: s.split())
    assert by_words([r"so \boxed{6} a b"], solution=["6"]) == [pytest.approx(0.5)]  # 4 words = max_len
    with pytest.raises(ConfigError, match="cosine_max_len"):
        CosineReward(cosine_max_len=0)


# --------------------------------------------------------------------------------------- repetition

@pytest.mark.parametrize(
    "completion, n, penalty, expected",
    [
        ("a b c a b c", 3, -1.0, -0.25),  # 3-grams abc bca cab abc: 3 unique of 4
        ("A B C a b c", 3, -1.0, -0.25),  # lower-cased first
        ("x x x x x", 3, -1.0, -2 / 3),  # xxx three times: 1 unique of 3
        ("the cat sat on the mat", 3, -1.0, 0.0),  # no repeated 3-gram
        ("a b a b", 2, -0.5, -0.5 / 3),  # ab ba ab: 2 unique of 3, scaled by -0.5
        ("one two", 3, -1.0, 0.0),  # fewer words than n
        ("one two three", 3, -1.0, 0.0),  # exactly one 3-gram
        ("", 3, -1.0, 0.0),
        ("a\nb\tc a  b c", 3, -1.0, -0.25),  # any whitespace separates words
    ],
)
def test_repetition_by_hand(completion, n, penalty, expected):
    reward = RepetitionPenalty(repetition_n_grams=n, repetition_max_penalty=penalty)
    assert reward([completion], solution=["ignored"]) == [pytest.approx(expected)]


def test_repetition_rejects_bad_options():
    with pytest.raises(ConfigError, match="repetition_max_penalty"):
        RepetitionPenalty(repetition_max_penalty=0.5)
    with pytest.raises(ConfigError, match="repetition_n_grams"):
        RepetitionPenalty(repetition_n_grams=0)


# ------------------------------------------------------------------------------------ soft_overlong

def test_soft_overlong_three_regimes():
    reward = SoftOverlong(soft_max_length=100, soft_cache_length=20)  # penalty starts after 80 tokens
    lengths = [0, 50, 80, 90, 100, 110]
    out = reward(["x"] * len(lengths), completion_ids=[[1] * n for n in lengths])
    # 0 up to 80; (80 - L) / 20 in between; past L_max ms-swift's code keeps falling (no clamp at -1)
    assert out == [0.0, 0.0, 0.0, pytest.approx(-0.5), pytest.approx(-1.0), pytest.approx(-1.5)]


def test_soft_overlong_defaults_and_character_fallback():
    reward = SoftOverlong(soft_cache_length=4, max_completion_length=10)  # L_max = max_completion_length
    assert reward.soft_max_length == 10
    assert reward(["abcdef", "abcdefgh", "abcdefghij"]) == [0.0, pytest.approx(-0.5), pytest.approx(-1.0)]
    with pytest.raises(ConfigError, match="soft_cache_length"):
        SoftOverlong(max_completion_length=10)
    with pytest.raises(ConfigError, match="smaller than"):
        SoftOverlong(soft_cache_length=10, soft_max_length=10)


# ----------------------------------------------------------------------------- registry and plugins

def test_build_reward_funcs_from_options():
    options = {
        "max_completion_length": 64,
        "cosine_max_len": None,
        "repetition_n_grams": 2,
        "repetition_max_penalty": -0.5,
        "soft_cache_length": 16,
        "soft_max_length": None,
        "learning_rate": 1e-6,  # unrelated options are ignored
    }
    funcs = build_reward_funcs(["accuracy", "format", "cosine", "repetition", "soft_overlong"], options)
    assert [name for name, _ in funcs] == ["accuracy", "format", "cosine", "repetition", "soft_overlong"]
    by_name = dict(funcs)
    assert by_name["accuracy"] is accuracy and by_name["format"] is format_reward
    assert by_name["cosine"].max_len == 64
    assert by_name["repetition"].ngram_size == 2 and by_name["repetition"].max_penalty == -0.5
    assert (by_name["soft_overlong"].soft_max_length, by_name["soft_overlong"].soft_cache_length) == (64, 16)


def test_unknown_and_duplicate_names():
    with pytest.raises(ConfigError, match="unknown reward function 'acuracy'.*accuracy, cosine, exact_match, format"):
        build_reward_funcs(["acuracy"], {})
    with pytest.raises(ConfigError, match="listed twice"):
        build_reward_funcs(["format", "format"], {})
    with pytest.raises(ConfigError, match="soft_cache_length"):
        build_reward_funcs(["soft_overlong"], {"max_completion_length": 64})


PLUGIN = '''
import jaxalign.rewards


@jaxalign.rewards.register("exact")
def exact(completions, solution, **kwargs):
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


@jaxalign.rewards.register("short")
class Short:
    def __init__(self, max_completion_length=1000, short_limit=3):
        self.limit = min(max_completion_length, short_limit)

    def __call__(self, completions, **kwargs):
        return [float(len(c) <= self.limit) for c in completions]


def _length(completions, **kwargs):
    return [float(len(c)) for c in completions]


reward_funcs = {"length": _length}
'''


def test_plugin_both_styles(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    names = ["exact", "short", "length", "format"]
    funcs = build_reward_funcs(names, {"max_completion_length": 2}, plugins=[str(path)])
    assert [name for name, _ in funcs] == ["exact", "short", "length", "format"]
    columns = {"solution": ["7", "9", "123"]}
    total, per_func = score_completions(funcs, [1.0, 1.0, 0.5, 1.0], ["7", "  8 ", "123"], columns)
    np.testing.assert_allclose(per_func["exact"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(per_func["short"], [1.0, 0.0, 0.0])  # limit = min(2, 3) from the options
    np.testing.assert_allclose(per_func["length"], [1.0, 4.0, 3.0])
    np.testing.assert_allclose(total, [2.5, 2.0, 2.5])
    assert {"exact", "short", "length"} <= set(rewards.available_reward_funcs())


def test_plugin_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import jaxalign.rewards\nraise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ConfigError, match=r"broken\.py failed to import: RuntimeError: boom second line") as info:
        load_plugins(str(broken))
    assert "\n" not in str(info.value)
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n")
    with pytest.raises(ConfigError, match=r"syntax\.py failed to import: SyntaxError"):
        build_reward_funcs(["format"], {}, plugins=[str(syntax)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_plugins(str(tmp_path / "missing.py"))
    bad_dict = tmp_path / "bad_dict.py"
    bad_dict.write_text("reward_funcs = ['not', 'a', 'dict']\n")
    with pytest.raises(ConfigError, match="must be a dict"):
        load_plugins(str(bad_dict))


# ---------------------------------------------------------------------------------------- scoring

def test_score_completions_weights_nan_and_metrics():
    def half(completions, **kwargs):
        return [0.5, None, float("nan")][: len(completions)]

    funcs = [("format", format_reward), ("half", half)]
    completions = ["<think>a</think><answer>1</answer>", "no tags", "<think>b</think><answer>2</answer>"]
    total, per_func = score_completions(funcs, None, completions, {"solution": ["1", "2", "3"]})
    assert total.dtype == np.float32 and total.shape == (3,)
    np.testing.assert_allclose(total, [1.5, 0.0, 1.0])  # None/NaN are left out of the sum (nansum)
    assert np.isnan(per_func["half"][1]) and np.isnan(per_func["half"][2])
    total, _ = score_completions(funcs, [2.0, -1.0], completions, {})
    np.testing.assert_allclose(total, [1.5, 0.0, 2.0])
    metrics = reward_metrics(per_func)
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/format/std"] == pytest.approx(np.std([1, 0, 1], ddof=1))
    assert metrics["rewards/half/mean"] == 0.5 and math.isnan(metrics["rewards/half/std"])
    with pytest.raises(ConfigError, match="1 values for 2 reward functions"):
        score_completions(funcs, [1.0], completions, {})


def test_score_completions_names_the_failing_row():
    def picky(completions, solution, **kwargs):
        return [1.0 / float(s) for s in solution]

    completions = ["a", "b", "c", "d"]
    message = r"reward function 'picky' failed on row 2: ZeroDivisionError: float division by zero"
    with pytest.raises(JaxalignError, match=message):
        score_completions([("picky", picky)], None, completions, {"solution": ["1", "2", "0", "0"]})


def test_score_completions_wrong_count_and_values():
    completions = ["a", "b", "c"]
    with pytest.raises(JaxalignError, match=r"reward function 'short' returned 2 values for 3 completions"):
        score_completions([("short", lambda c, **k: [1.0, 2.0])], None, completions, {})
    with pytest.raises(JaxalignError, match=r"reward function 'scalar' returned float"):
        score_completions([("scalar", lambda c, **k: 1.0)], None, completions, {})
    with pytest.raises(JaxalignError, match=r"'text' returned 'high' on row 1"):
        score_completions([("text", lambda c, **k: [1.0, "high", 0.0])], None, completions, {})
    with pytest.raises(JaxalignError, match=r"'inf' returned inf on row 0"):
        score_completions([("inf", lambda c, **k: [math.inf, 0.0, 0.0])], None, completions, {})

    def batch_only(completions, **kwargs):  # fails on the batch but not on any single row
        if len(completions) > 1:
            raise RuntimeError("needs one at a time")
        return [0.0]

    with pytest.raises(JaxalignError, match=r"reward function 'batch_only' failed: RuntimeError: needs one at a time"):
        score_completions([("batch_only", batch_only)], None, completions, {})
    # numpy output is fine
    total, _ = score_completions([("np", lambda c, **k: np.array([1, 2, 3], dtype=np.int64))], None, completions, {})
    np.testing.assert_allclose(total, [1.0, 2.0, 3.0])


def test_exact_match_reward():
    from jaxalign.rewards.exact_match import exact_match_reward

    got = exact_match_reward(["357", " 357 ", "<answer>357</answer>", "358", "3570", "357<|im_end|>"], solution=["357"] * 6)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(JaxalignError, match="solution"):
        exact_match_reward(["1"])
