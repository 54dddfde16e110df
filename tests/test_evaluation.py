"""Held-out evaluation helpers: greedy and sampled completions, exact match (bookkeeping on a tiny model;
the sampler's distribution itself is tested in test_sampler.py)."""

from jaxalign.convert import load_hf_model
from jaxalign.demo import make_prompt_rows
from jaxalign.demo.evaluation import exact_match_accuracy, greedy_completions, sampled_completions, sampled_exact_match


def test_sampled_completions_are_row_major_and_seeded(tiny_model_dir, char_tokenizer):
    model, tok = load_hf_model(tiny_model_dir), char_tokenizer
    rows = make_prompt_rows(5, seed=0, digits=(1, 2))
    greedy = greedy_completions(model, tok, rows, max_new_tokens=4, batch_size=4)
    assert len(greedy) == 5
    # Temperature 0: every row's samples are its greedy completion, in row order.
    assert sampled_completions(model, tok, rows, max_new_tokens=4, samples=3, batch_size=4) == [g for g in greedy for _ in range(3)]
    # Rows whose solution is the greedy text score 1, the others 0: 3 of 5 right.
    scored = [dict(r, solution=g if i < 3 else g + "9") for i, (r, g) in enumerate(zip(rows, greedy))]
    assert exact_match_accuracy(model, tok, scored, max_new_tokens=4, batch_size=4)[0] == 0.6
    assert sampled_exact_match(model, tok, scored, max_new_tokens=4, samples=3, temperature=0.0) == 0.6
    # Temperature 1 on a random model: samples differ from greedy and between seeds, not within a seed.
    a = sampled_completions(model, tok, rows, max_new_tokens=4, temperature=1.0, samples=3, seed=0)
    assert a == sampled_completions(model, tok, rows, max_new_tokens=4, temperature=1.0, samples=3, seed=0)
    assert a != sampled_completions(model, tok, rows, max_new_tokens=4, temperature=1.0, samples=3, seed=1)
    assert a != [g for g in greedy for _ in range(3)]
