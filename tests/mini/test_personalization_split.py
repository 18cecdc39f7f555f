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


def test_whole_unet_fine_tune_changes_every_block_and_puts_the_base_back(split_bench, mini, tmp_path):
    """The capacity diagnostic (``--whole-unet``): the returned weights differ from the base's in the encoder, the
    middle and the decoder; the shared UNet is the base again after training and after generating with them."""
    subject = concepts.split("tuning").subjects[0]
    folder = concepts.write_example_set(subject, tmp_path / "examples")
    own = {k: v.clone() for k, v in mini.unet.state_dict().items()}
    with torch.enable_grad():
        trained = split_bench.finetune_unet(mini, "subject", folder, 0, steps=2, lr_schedule="cosine")
    assert all(torch.equal(v, own[k]) for k, v in mini.unet.state_dict().items())
    moved = {k.split(".")[0] for k, v in trained.items() if not torch.equal(v, own[k])}
    assert {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out"} <= moved
    with split_bench.unet_weights(mini, trained):
        assert all(torch.equal(v, trained[k]) for k, v in mini.unet.state_dict().items())
    assert all(torch.equal(v, own[k]) for k, v in mini.unet.state_dict().items())
    assert not any(p.requires_grad for p in mini.unet.parameters()) and not mini.unet.training
