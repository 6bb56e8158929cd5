"""A learner's exported checkpoint reloads in transformers with exactly the learner's logits."""

from __future__ import annotations

import pytest
import ray
import torch

from align.config import load_sft_recipe
from align.distributed.worker_group import WorkerGroup, start_ray, worker_env
from align.trainers.sft_learner import SFTLearner
from tests.conftest import TINY_RECIPE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    start_ray(None, 2, 0)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("zero_stage", "lora"), [(2, False), (3, False), (2, True)])
def test_export_reloads_to_identical_logits(ray_session, tmp_path, zero_stage, lora):
    recipe = load_sft_recipe(TINY_RECIPE, [f"deepspeed.zero_stage={zero_stage}", "cluster.num_workers=1",
                                           f"lora.enabled={str(lora).lower()}", "train.lr=1e-2"])
    group = WorkerGroup("export-test", 1, 1, 0, "PACK", worker_env(1), timeout_s=300)
    try:
        address, port = group.rendezvous()
        group.construct(SFTLearner, [{"recipe": recipe, "rank": 0, "world_size": 1, "master_addr": address,
                                      "master_port": port, "total_steps": 10}])
        for _ in range(3):
            group.call("train_step")
        input_ids = torch.randint(3, 1000, (2, 40))
        trained = group.call("logits", input_ids)[0]
        group.call("export_hf", str(tmp_path))
    finally:
        group.shutdown()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = model(input_ids=input_ids, use_cache=False).logits
    # Full weights reload bit for bit. Merged LoRA computes (W + BA)x where training computed Wx + B(Ax):
    # the same function, rounded differently in fp32, so it gets float tolerance.
    tolerance = 1e-5 if lora else 0.0
    torch.testing.assert_close(reloaded, trained, rtol=tolerance, atol=tolerance)
    if lora:
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
