"""The one tiny-model builder (modeling.tinymodel.tiny_llama): the demo's model by default, every other
caller naming what differs, and each caller's RNG behaviour kept."""

from __future__ import annotations

from pathlib import Path

import torch

from modeling.tinymodel import TINY_SHAPE, build_tiny_causal_lm, tiny_llama, train_tokenizer
from modeling.train import TrainConfig


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_default_shape_is_the_demos_tiny_config() -> None:
    shape = TrainConfig(dataset="d", out_dir="o", stage="pretrain").tiny

    assert shape == {**TINY_SHAPE, "vocab_size": 1024}


def test_the_default_model_has_the_demos_architecture() -> None:
    config = tiny_llama(vocab_size=64).config

    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 4)
    assert (config.intermediate_size, config.num_key_value_heads) == (384, 4)
    assert config.tie_word_embeddings


def test_a_private_stream_leaves_the_global_rng_where_it_was() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()

    tiny_llama(vocab_size=64, hidden_size=16, num_layers=1, seed=3)

    assert torch.equal(torch.get_rng_state(), before)


def test_the_global_stream_is_seeded_and_advanced_as_training_expects() -> None:
    torch.manual_seed(7)
    a = tiny_llama(vocab_size=64, hidden_size=16, num_layers=1, seed=3, private_rng=False)
    after_a = torch.get_rng_state()
    b = tiny_llama(vocab_size=64, hidden_size=16, num_layers=1, seed=3)

    assert same_weights(a, b)
    torch.manual_seed(99)  # whatever came before, the build reseeds the global stream and draws from it
    tiny_llama(vocab_size=64, hidden_size=16, num_layers=1, seed=3, private_rng=False)
    assert torch.equal(torch.get_rng_state(), after_a)
    torch.manual_seed(3)
    assert not torch.equal(torch.get_rng_state(), after_a)


def test_the_saved_test_model_is_the_builders_with_untied_embeddings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(["a small text for a small tokenizer"] * 20, tmp_path / "tok", vocab_size=300)
    saved = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "m", tok, hidden_size=32))
    built = tiny_llama(
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        tokenizer=tok,
    )

    assert same_weights(saved, built)
    assert not saved.config.tie_word_embeddings and saved.config.pad_token_id == tok.pad_token_id


def test_grouped_query_attention_and_other_config_fields_pass_through() -> None:
    model = tiny_llama(
        vocab_size=64, hidden_size=32, num_kv_heads=2, initializer_range=0.3, attn_implementation="eager"
    )

    assert model.config.num_key_value_heads == 2 and model.config.initializer_range == 0.3
    assert model.config._attn_implementation == "eager"
