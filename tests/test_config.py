"""Strict config loading: the shipped configs, derived properties, and one error type for bad input."""

import copy
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LOCKED, TINY
from vpmoe.config import ARCHITECTURE_TABLES, ConfigError, config_from_dict, load_config

LOCKED_DOC = tomllib.loads(LOCKED.read_text())


def test_locked_config_matches_the_architecture(locked_cfg):
    m, moe = locked_cfg.model, locked_cfg.moe
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim) == (80, 1024, 8, 2, 128)
    assert (moe.num_experts, moe.topk, moe.router_num_groups, moe.router_group_topk) == (256, 4, 8, 4)
    assert moe.router_topk_scaling_factor == 2.5 and moe.aux_loss_coeff == 1e-4
    assert moe.router_bias_update_rate == 1e-3 and moe.shared_expert_size == 512 and m.ffn_hidden_size == 128
    assert locked_cfg.attention.window_size == 128 and locked_cfg.tokenizer.vocab_size == 201088
    assert (locked_cfg.tpa.tpa_q_rank, locked_cfg.tpa.tpa_rank) == (4, 2)


def test_layer_map_of_the_locked_config(locked_cfg):
    kinds = locked_cfg.layer_kinds
    assert kinds.count("local") == 60 and kinds.count("global") == 20
    assert [layer for layer, k in enumerate(kinds, 1) if k == "global"] == list(range(4, 81, 4))
    assert kinds[0] == "local"
    assert locked_cfg.moe_layers[0] is False and sum(locked_cfg.moe_layers) == 79


def test_tiny_config_keeps_every_mechanism_alive(tiny_cfg):
    assert tiny_cfg.model.num_layers >= 8
    assert tiny_cfg.layer_kinds.count("global") >= 2 and not tiny_cfg.moe_layers[0]
    assert tiny_cfg.training.seq_length > tiny_cfg.attention.window_size
    moe = tiny_cfg.moe
    assert moe.topk // moe.router_group_topk >= 2, "groups must score by more than their best expert"
    assert moe.router_group_topk < moe.router_num_groups
    assert moe.shared_expert and moe.router_enable_expert_bias and tiny_cfg.model.value_residual
    assert tiny_cfg.model.softmax_type == "learnable" and tiny_cfg.tpa.use_tpa


def test_tiny_has_the_same_keys_as_locked():
    tiny = tomllib.loads(TINY.read_text())
    assert {t: set(v) for t, v in tiny.items() if t != "meta"} == \
        {t: set(v) for t, v in LOCKED_DOC.items() if t != "meta"}


def test_architecture_hash_ignores_runtime(locked_cfg):
    doc = copy.deepcopy(LOCKED_DOC)
    doc["runtime"]["dtype"] = "float32"
    assert config_from_dict(doc).architecture_hash() == locked_cfg.architecture_hash()
    doc["moe"]["topk"] = 8
    assert config_from_dict(doc).architecture_hash() != locked_cfg.architecture_hash()


@pytest.mark.parametrize(("table", "key", "value", "needle"), [
    ("moe", "router_group_topk", 9, "[moe].router_group_topk must be in 1..8"),
    ("moe", "router_num_groups", 7, "[moe].router_num_groups must divide num_experts"),
    ("moe", "topk", 200, "[moe].topk must be <= 128"),
    ("model", "num_query_groups", 3, "[model].num_query_groups must divide num_attention_heads"),
    ("attention", "window_size", 0, "[attention].window_size must be >= 1, got 0"),
    ("model", "num_layers", True, "[model].num_layers must be an integer, got True"),
    ("model", "hidden_size", 1024.0, "[model].hidden_size must be an integer"),
    ("model", "qk_layernorm", 1, "[model].qk_layernorm must be true or false"),
    ("moe", "router_score_function", "softmax", "[moe].router_score_function must be one of"),
    ("model", "value_residual_init", 1.0, "[model].value_residual_init must be < 1.0"),
    ("model", "bogus", 1, "[model].bogus is not a known key"),
])
def test_bad_values_name_file_key_value(table, key, value, needle):
    doc = copy.deepcopy(LOCKED_DOC)
    doc[table][key] = value
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, source="configs/vpmoe.toml")
    assert str(err.value).startswith("configs/vpmoe.toml: ")
    assert needle in str(err.value)


def test_missing_key_and_unknown_table():
    doc = copy.deepcopy(LOCKED_DOC)
    del doc["moe"]["topk"]
    with pytest.raises(ConfigError, match=r"\[moe\]\.topk is missing"):
        config_from_dict(doc)
    doc = copy.deepcopy(LOCKED_DOC)
    doc["modle"] = {}
    with pytest.raises(ConfigError, match=r"\[modle\] is not a known table"):
        config_from_dict(doc)


def test_missing_and_non_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nnum_layers = ")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


ARCH_KEYS = [(t, k) for t in ARCHITECTURE_TABLES for k in LOCKED_DOC[t]]
BAD_VALUES = st.one_of(
    st.booleans(), st.integers(-5, 0), st.integers(10**6, 10**7), st.floats(allow_nan=True),
    st.text(max_size=5), st.none().map(lambda _: [1, 2]), st.just({"x": 1}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(ARCH_KEYS), value=BAD_VALUES, action=st.sampled_from(["set", "delete", "extra"]))
def test_mutations_give_config_error_and_nothing_else(key, value, action):
    """Every mutation of the locked config either still validates or raises ConfigError naming the key."""
    table, name = key
    doc = copy.deepcopy(LOCKED_DOC)
    if action == "set":
        doc[table][name] = value
    elif action == "delete":
        del doc[table][name]
    else:
        doc[table][name + "_x"] = value
    try:
        cfg = config_from_dict(doc, source="locked.toml")
    except ConfigError as exc:
        assert str(exc).startswith("locked.toml: [")
        assert f"[{table}]" in str(exc)
        return
    assert action == "set"
    assert getattr(getattr(cfg, table), name) == value
