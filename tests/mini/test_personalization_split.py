"""bench/personalization_split.py's textual-inversion stage (two-stage pivotal tuning) on mini: only the token's
rows learn, they reach the prompt's conditioning, and the shared base's tables come back exactly."""


import pytest
import torch

from zipq_mini import concepts

from helpers import bench_module


@pytest.fixture(scope="module")
def split_bench():
    with bench_module("personalization_split") as module:
        yield module


def test_textual_inversion_moves_only_the_tokens_rows_and_puts_the_tables_back(split_bench, mini, tmp_path):
    from zipq_core.encode import encode_text

    style = concepts.split("tuning").styles[0]
    folder = concepts.write_example_set(style, tmp_path / "examples")
    tables = [t.weight.detach().clone() for t, _ in split_bench.token_vectors(mini, concepts.STYLE_TOKEN)]
    prompt = [f"a red circle in {concepts.STYLE_TOKEN} style"]
    before = encode_text(mini, prompt, 64).hidden
    with torch.enable_grad():
        learned = split_bench.learn_token(mini, "style", folder, steps=3, lr=1e-2, seed=0)
    after_learning = [t.weight for t, _ in split_bench.token_vectors(mini, concepts.STYLE_TOKEN)]
    assert all(torch.equal(a, b) for a, b in zip(after_learning, tables))  # learning leaves the base alone
    with split_bench.token_embedding(mini, concepts.STYLE_TOKEN, learned):
        for (table, ids), old, vectors in zip(split_bench.token_vectors(mini, concepts.STYLE_TOKEN), tables, learned):
            changed = (table.weight != old).any(dim=1).nonzero().flatten().tolist()
            assert changed == sorted(ids) and torch.equal(table.weight[ids], vectors)
        inside = encode_text(mini, prompt, 64).hidden
    assert not torch.allclose(inside, before)  # the learned vectors condition the prompt
    assert all(torch.equal(t.weight, old) for (t, _), old in
               zip(split_bench.token_vectors(mini, concepts.STYLE_TOKEN), tables))
    assert torch.equal(encode_text(mini, prompt, 64).hidden, before)
