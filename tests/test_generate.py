"""Jitted generation with a sliding-window KV cache, against `transformers`' `generate`."""

import numpy as np
import pytest
import torch

import hmoe_jax
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.model.generate import generate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # Window 4 with 10-token prompts and 24 new tokens: the ring buffer wraps many times.
    cfg = synthetic.tiny_config(num_hidden_layers=3, sliding_window=4)
    path = synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("gen"), cfg, seed=5)
    return hmoe_jax.from_pretrained(path), synthetic.load_torch_reference(path)


def left_padded_prompts(seed, lengths, t, vocab):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(lengths), t))
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, t - n:] = 1
    return np.where(mask == 1, ids, 0), mask


@pytest.mark.parametrize("layerwise", [False, True])
def test_greedy_tokens_equal_transformers_generate(pair, layerwise):
    ours_model, ref_model = pair
    ids, mask = left_padded_prompts(0, [10, 7, 4], 10, ours_model.config.vocab_size)
    with ours_model.using(execution="layerwise" if layerwise else "program"):
        ours = np.asarray(generate(ours_model, ids, mask, max_new_tokens=24))
    with torch.no_grad():
        ref = ref_model.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=24,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("layerwise", [False, True])
def test_rows_emit_padding_after_eos(pair, layerwise):
    ours_model, _ = pair
    ids, mask = left_padded_prompts(1, [10, 10], 10, ours_model.config.vocab_size)
    with ours_model.using(execution="layerwise" if layerwise else "program"):
        free = np.asarray(generate(ours_model, ids, mask, max_new_tokens=12))
        eos = int(free[0, 3])  # make the 4th greedy token of row 0 the end-of-sequence token
        stopped = np.asarray(generate(ours_model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1:] == 0).all()


def test_sampling_is_reproducible_and_differs_from_greedy(pair):
    ours_model, _ = pair
    ids, mask = left_padded_prompts(2, [8, 8], 8, ours_model.config.vocab_size)
    a = np.asarray(generate(ours_model, ids, mask, max_new_tokens=16, temperature=1.5, seed=3))
    b = np.asarray(generate(ours_model, ids, mask, max_new_tokens=16, temperature=1.5, seed=3))
    greedy = np.asarray(generate(ours_model, ids, mask, max_new_tokens=16))
    np.testing.assert_array_equal(a, b)
    assert (a != greedy).any()
    top1 = np.asarray(generate(ours_model, ids, mask, max_new_tokens=16, temperature=1.0, top_k=1, seed=4))
    np.testing.assert_array_equal(top1, greedy)  # top-k of 1 leaves only the argmax


def test_layerwise_sampling_draws_the_tokens_of_the_one_program_loop(pair):
    """Same seed, same key splits, same logits: layerwise sampling (top-k and plain) equals the scan."""
    from hmoe_jax.model.transformer import _jitted as call_jitted

    ours_model, _ = pair
    ids, mask = left_padded_prompts(5, [9, 6], 9, ours_model.config.vocab_size)
    for kwargs in (dict(temperature=1.5, seed=3), dict(temperature=0.8, top_k=5, seed=8)):
        fused = np.asarray(generate(ours_model, ids, mask, max_new_tokens=14, **kwargs))
        call_jitted.clear_cache()
        with ours_model.using(execution="layerwise"):
            layerwise = np.asarray(generate(ours_model, ids, mask, max_new_tokens=14, **kwargs))
        np.testing.assert_array_equal(layerwise, fused)
    # embedding of the prompt and of one token, prefill per kind of block, logits after the prompt and
    # after one token, decode per kind of block: however many tokens and layers
    kinds = len(set(ours_model.config.layer_types))
    assert call_jitted._cache_size() == 4 + 2 * kinds
    with ours_model.using(execution="layerwise"):
        assert generate(ours_model, ids, mask, max_new_tokens=0).shape == (2, 0)


def test_right_padded_prompts_are_rejected(pair):
    ours_model, _ = pair
    ids = np.ones((1, 5), np.int64)
    mask = np.array([[1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours_model, ids, mask)
