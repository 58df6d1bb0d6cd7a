"""Recipe validation: shipped recipes are valid, errors name the key path, and fuzzed input only ever raises
the project's RecipeError."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprune_opt.config import PrunerConfig
from attnprune_opt.errors import RecipeError
from attnprune_opt.recipes import RECIPES_DIR

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_ship_and_validate():
    assert len(RECIPES) >= 8
    for path in RECIPES:
        config = PrunerConfig.from_yaml(path)
        assert PrunerConfig.from_dict(config.to_dict()) == config
        assert PrunerConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("data,message", [
    ({"rules": [{"modules": ["q_proj"], "method": "attention", "sparsity": 1.0}]}, "rules.0.sparsity"),
    ({"rules": [{"modules": ["q_proj"], "method": "attention", "sparsity": -0.1}]}, "rules.0.sparsity"),
    ({"attention": {"lamda": 0.1}}, "unknown key 'attention.lamda'; did you mean 'lam'"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "sparsty": 0.5}]}, "did you mean 'sparsity'"),
    ({"calibraton": {}}, "did you mean 'calibration'"),
    ({"rules": [{"modules": ["v_proj"], "method": "attention", "sparsity": 0.5}]}, "q_proj/k_proj only"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "structure": "1:4", "sparsity": 0.5}]},
     "sparsity must be 0.75"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "structure": "4:2"}]}, "0 < N < M"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda"}]}, "sparsity is required"),
    ({"rules": [{"modules": ["q_proj"], "method": "prune_it", "sparsity": 0.5}]}, "rules.0.method"),
    ({"rules": [{"modules": ["qkv"], "method": "wanda", "sparsity": 0.5}]}, "rules.0.modules.0"),
    ({"rules": []}, "at least one module"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "sparsity": 0.5},
                {"modules": ["q_proj"], "method": "magnitude", "sparsity": 0.5}]}, "targeted by rules 0 and 1"),
    ({"attention": {"lam": float("nan")}}, "attention.lam"),
    # a setting the configuration never reads is an error, not silently ignored
    ({"attention": {"lam": 0.1}}, "attention.lam: not used: read only with mask 'descent', not 'wanda'"),
    ({"attention": {"refit_iterations": 0, "refit_lr": 0.1}}, "attention.refit_lr: not used: read only when"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "sparsity": 0.5}], "sparsegpt": {"blocksize": 8}},
     "sparsegpt: settings of method 'sparsegpt', which no rule uses"),
    ({"rules": [{"modules": ["q_proj"], "method": "wanda", "sparsity": 0.5}], "attention": {"mask": "wanda"}},
     "attention: settings of method 'attention', which no rule uses"),
])
def test_errors_name_the_problem(data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        PrunerConfig.from_dict(data)


def test_n_m_implies_sparsity():
    config = PrunerConfig.from_dict({"rules": [{"modules": ["q_proj"], "method": "wanda", "structure": "2:4"}]})
    assert config.rules[0].sparsity == 0.5 and config.rules[0].n_m == (2, 4)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        PrunerConfig.from_yaml(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        PrunerConfig.from_yaml(unsafe)
    with pytest.raises(RecipeError, match=r"missing.yaml not found: neither a file nor a packaged recipe \(llama32"):
        PrunerConfig.from_yaml(tmp_path / "missing.yaml")
    assert PrunerConfig.from_yaml("smollm2_qk70") == PrunerConfig.from_yaml(RECIPES_DIR / "smollm2_qk70.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        PrunerConfig.from_yaml(scalar)


KEYS = st.sampled_from(["rules", "attention", "sparsegpt", "calibration", "propagate", "layers", "seed", "model",
                        "modules", "method", "sparsity", "structure", "lam", "iterations", "group", "score",
                        "source", "num_samples", "seq_len", "rows", "x", ""])
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.sampled_from(["q_proj", "attention", "2:4", "row", "c4", "pruned"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzzed_dicts_raise_only_recipe_errors(data):
    try:
        config = PrunerConfig.from_dict(data)
    except RecipeError:
        return
    assert PrunerConfig.from_dict(config.to_dict()) == config


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzzed_yaml_text_raises_only_recipe_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(text)
    try:
        PrunerConfig.from_yaml(path)
    except RecipeError:
        pass
