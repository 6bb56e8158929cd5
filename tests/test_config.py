"""Recipe validation: every mistake is one line naming the file and the key, before anything starts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from align.config import RecipeError, SFTRecipe, load_recipe, load_sft_recipe
from tests.conftest import ROOT, TINY_RECIPE


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.read_text() + text)
    return path


def test_shipped_recipe_loads_with_typed_values():
    recipe = load_sft_recipe(TINY_RECIPE)
    assert recipe.train.lr == pytest.approx(2e-3)
    assert recipe.train.global_batch_size == 8 * 1 * 2
    assert recipe.model.preset == "deepseek-v2-tiny"


def test_overrides_are_parsed_as_yaml_values():
    recipe = load_sft_recipe(TINY_RECIPE, ["train.lr=1e-4", "deepspeed.zero_stage=3", "data.packing=false"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.deepspeed.zero_stage == 3
    assert recipe.data.packing is False


@pytest.mark.parametrize(("key", "meant"), [("micro_batchsize", "micro_batch_size"), ("learning_rate", "lr")])
def test_unknown_key_suggests_the_close_one(key, meant):
    with pytest.raises(RecipeError, match=rf"sft-tiny.yaml: unknown key train.{key} \(did you mean train.{meant}\?\)"):
        load_sft_recipe(TINY_RECIPE, [f"train.{key}=1"])


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "\nlogging: {every: 3}\n")
    with pytest.raises(RecipeError, match=rf"^{path}: unknown key logging$"):
        load_sft_recipe(path)


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"train.micro_batch_size: expected an integer, got 'eight'"):
        load_sft_recipe(TINY_RECIPE, ["train.micro_batch_size=eight"])


def test_wrong_choice_lists_the_choices():
    with pytest.raises(RecipeError, match=r"deepspeed.precision: 'fp8' is not one of 'fp32', 'bf16'"):
        load_sft_recipe(TINY_RECIPE, ["deepspeed.precision=fp8"])


def test_missing_data_file_is_named():
    with pytest.raises(RecipeError, match=r"data.train\[0\]: file not found: nowhere.jsonl"):
        load_sft_recipe(TINY_RECIPE, ["data.train=[nowhere.jsonl]"])


def test_batch_arithmetic_that_does_not_divide():
    with pytest.raises(RecipeError, match=r"global_batch_size=30 != micro_batch_size 8 x grad_accum 1 x "
                                          r"cluster.num_workers 2 = 16"):
        load_sft_recipe(TINY_RECIPE, ["train.global_batch_size=30"])


def test_model_path_that_is_not_a_model(tmp_path):
    with pytest.raises(RecipeError, match=r"model.path: .* is not a model directory \(no config.json\)"):
        load_sft_recipe(TINY_RECIPE, ["model.preset=null", f"model.path={tmp_path}"])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(RecipeError, match=r"model.preset: unknown preset 'deepseek-v9'; choose one of .*"
                                          r"deepseek-v2-tiny"):
        load_sft_recipe(TINY_RECIPE, ["model.preset=deepseek-v9"])


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  preset: x\n train: [\n")
    with pytest.raises(RecipeError, match=rf"{path}:\d+: invalid YAML"):
        load_sft_recipe(path)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "align.cli", "sft", str(TINY_RECIPE), "train.lr=fast"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"align: error: {TINY_RECIPE}: train.lr: expected a number, got 'fast'"]


def test_mapping_overrides_reach_the_model_section():
    recipe = load_sft_recipe(TINY_RECIPE, ["model.preset_overrides={kv_lora_rank: 512, qk_rope_head_dim: 64}"])
    assert recipe.model.preset_overrides == {"kv_lora_rank": 512, "qk_rope_head_dim": 64}
    with pytest.raises(RecipeError, match=r"model.preset_overrides: expected a mapping, got int"):
        load_sft_recipe(TINY_RECIPE, ["model.preset_overrides=3"])


def test_section_defaults_keep_their_own_values():
    from align.config.grpo_schema import GRPORecipe
    from align.config.loader import build

    recipe = build(GRPORecipe, {"model": {"path": "x"}, "data": {"train": ["p.jsonl"]},
                                "rewards": [{"name": "math_answer"}]}, "r.yaml")
    assert recipe.output.dir == "runs/grpo" and recipe.train.lr == 1e-6 and recipe.train.schedule == "constant"
    assert recipe.train.grad_accum == 8 * 8 // 2 // 8  # prompts x G / learners / micro-batch


def test_gspo_ratios_get_their_own_clip_defaults_and_the_held_out_reward_its_args():
    from align.config import load_grpo_recipe
    from align.trainers.grpo import heldout_reward_args

    fresh = ["model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny"]
    token = load_grpo_recipe("recipes/grpo-tiny.yaml", fresh)
    assert (token.algorithm.clip_eps, token.algorithm.clip_eps_high) == (0.2, None)
    gspo = load_grpo_recipe("recipes/grpo-tiny.yaml", [*fresh, "algorithm.ratio_level=sequence"])
    assert (gspo.algorithm.clip_eps, gspo.algorithm.clip_eps_high) == (3e-4, 4e-4)  # GSPO paper, sec. 5.1
    chosen = load_grpo_recipe("recipes/grpo-tiny.yaml", [*fresh, "algorithm.ratio_level=sequence",
                                                          "algorithm.clip_eps=1e-3"])
    assert (chosen.algorithm.clip_eps, chosen.algorithm.clip_eps_high) == (1e-3, None)  # as given: symmetric
    rm = {"name": "reward_model", "args": {"path": "runs/rm-tiny/final"}}
    recipe = load_grpo_recipe("recipes/grpo-tiny.yaml", [*fresh, f"rewards=[{rm}]",
                                                          "data.heldout_reward=reward_model"])
    assert heldout_reward_args(recipe) == {"path": "runs/rm-tiny/final"}
    recipe = load_grpo_recipe("recipes/grpo-tiny.yaml", [*fresh, "data.heldout_reward_args={strict: true}"])
    assert heldout_reward_args(recipe) == {"strict": True}
    assert heldout_reward_args(token) == {}
    from align.trainers.grpo_learner import optimizer_steps

    twice = load_grpo_recipe("recipes/grpo-tiny.yaml", [*fresh, "algorithm.updates_per_batch=2"])
    assert optimizer_steps(twice) == 2 * twice.algorithm.steps  # the lr schedule's length


def test_grpo_batch_that_does_not_split_over_learners():
    from align.config import load_grpo_recipe

    with pytest.raises(RecipeError, match=r"prompts_per_step 3 x group_size 8 = 24 completions must split into "
                                          r"cluster.num_workers 2 x a multiple of train.micro_batch_size 16"):
        load_grpo_recipe("recipes/grpo-tiny.yaml", ["algorithm.prompts_per_step=3", "model.path=data/tokenizer-tiny"])


def test_grpo_rollout_options_reach_the_vllm_engine():
    from align.config import load_grpo_recipe

    recipe = load_grpo_recipe("recipes/grpo-tiny.yaml", [
        "rollout.engine=vllm", "rollout.kv_cache_gib=0.5", "rollout.max_model_len=512", "model.path=null",
        "model.preset=llama-tiny", "model.tokenizer=data/tokenizer-tiny"])
    assert recipe.rollout.engine == "vllm"
    assert recipe.rollout.vllm_options() == {"max_model_len": 512, "kv_cache_gib": 0.5,
                                             "gpu_memory_utilization": 0.9, "enforce_eager": None,
                                             "enable_sleep_mode": False}


def test_colocated_engines_cannot_sample_ahead():
    from align.config import load_grpo_recipe

    with pytest.raises(RecipeError, match="max_staleness > 0 needs rollout.placement=split"):
        load_grpo_recipe("recipes/grpo-tiny.yaml", ["rollout.placement=colocated", "algorithm.max_staleness=1",
                                                    "model.path=data/tokenizer-tiny"])


def test_max_staleness_defaults_the_behaviour_weight_cap_and_names_its_old_key():
    from align.config import load_grpo_recipe

    base = ["model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny"]
    assert load_grpo_recipe("recipes/grpo-tiny.yaml", base).algorithm.behaviour_cap is None
    ahead = load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "algorithm.max_staleness=2"]).algorithm
    assert ahead.behaviour_cap == 2.0 and ahead.tis_cap is None  # resolved, not stored: k = 0 again is synchronous
    kept = load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "algorithm.max_staleness=1", "algorithm.tis_cap=1.5"])
    assert kept.algorithm.behaviour_cap == 1.5
    with pytest.raises(RecipeError, match="algorithm.overlap_rollout .did you mean algorithm.max_staleness"):
        load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "algorithm.overlap_rollout=true"])
    with pytest.raises(RecipeError, match="max_staleness must be >= 0"):
        load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "algorithm.max_staleness=-1"])
    with pytest.raises(RecipeError, match="rollout.top_k must be >= 0"):
        load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "rollout.top_k=-2"])


def test_reference_and_engines_are_built_in_the_policy_s_training_dtype():
    from align.config import load_grpo_recipe

    base = ["model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny"]
    assert load_grpo_recipe("recipes/grpo-tiny.yaml", base).policy_dtype == "float32"
    assert load_grpo_recipe("recipes/grpo-tiny.yaml", [*base, "deepspeed.precision=bf16"]).policy_dtype == "bfloat16"


def test_grpo_check_names_the_engine_auto_picks(capsys, tmp_path):
    from align.cli import main

    base = ["model.path=null", "model.tokenizer=data/tokenizer-tiny", "data.heldout_limit=5"]
    assert main(["grpo", "recipes/grpo-tiny.yaml", "--check", *base, "model.preset=deepseek-v2-tiny",
                 "rollout.engine=auto"]) == 0
    assert "2000 prompts, 5 held-out; rollout engine: torch" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "1 + 1 ="}], "answer": "2"}\n{"prompt": "oops"}\n')
    assert main(["grpo", "recipes/grpo-tiny.yaml", "--check", *base, "model.preset=deepseek-v2-tiny",
                 f"data.train=[{bad}]"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "recipe", "override", "error"), [
    ("sft", str(TINY_RECIPE), "data.messages_key=conversation",
     r"data/sft-tiny/train.jsonl:1: 'conversation' must be a non-empty list"),
    ("grpo", "recipes/grpo-tiny.yaml", "data.prompt_key=question",
     r"data/math-tiny/train.jsonl:1: 'question' must be a list of messages"),
    ("grpo", "recipes/grpo-tiny.yaml", "data.answer_key=solution",
     r"data/math-tiny/train.jsonl:1: no 'solution' column"),
])
def test_a_dataset_without_the_named_column_stops_before_any_worker(tmp_path, command, recipe, override, error):
    extra = ["model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny"] \
        if command == "grpo" else []
    result = subprocess.run([sys.executable, "-m", "align.cli", command, recipe, *extra, override,
                             f"output.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert re.search(error, lines[-1]) and lines[-1].startswith("align: error: "), lines[-1]
    assert "Ray" not in result.stderr and not (tmp_path / "run").exists()  # nothing started, nothing written


def test_zero_stage_0_in_fp32_is_refused_for_lack_of_a_nan_check():
    with pytest.raises(RecipeError, match=r"deepspeed.zero_stage 0 in fp32 has no non-finite gradient check"):
        load_sft_recipe(TINY_RECIPE, ["deepspeed.zero_stage=0"])
    bf16 = load_sft_recipe(TINY_RECIPE, ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"])
    assert bf16.deepspeed.zero_stage == 0


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_loads_under_its_schema(recipe):
    """Keys and types of every recipe in recipes/ (the files they name are checked when a run starts; some are
    made first, by the demo or by scripts/convert_smollm2.py)."""
    from align.config.grpo_schema import GRPORecipe
    from align.config.rm_schema import RMRecipe

    schema = {"sft": SFTRecipe, "grpo": GRPORecipe, "rm": RMRecipe}[recipe.name.split("-")[0]]
    assert isinstance(load_recipe(schema, recipe, []), schema)
