"""A learner's exported checkpoint reloads in transformers with exactly the learner's logits."""

from __future__ import annotations

import pytest
import torch

from align.config import load_sft_recipe
from align.distributed.worker_group import WorkerGroup, worker_env
from align.trainers.sft_learner import SFTLearner
from tests.conftest import TINY_RECIPE

pytestmark = [pytest.mark.slow, pytest.mark.precision]


@pytest.mark.parametrize(("zero_stage", "lora", "extra"), [
    (2, False, []),
    (3, False, []),
    (2, True, []),
    # bf16 with fp32 master weights in DeepSpeed's CPU Adam (optimizer offload), accumulating 2 micro-batches
    (2, False, ["deepspeed.precision=bf16", "deepspeed.offload_optimizer=true", "train.grad_accum=2"]),
])
def test_export_reloads_to_identical_logits(ray_cluster, tmp_path, zero_stage, lora, extra):
    recipe = load_sft_recipe(TINY_RECIPE, [f"deepspeed.zero_stage={zero_stage}", "cluster.num_workers=1",
                                           f"lora.enabled={str(lora).lower()}", "train.lr=1e-2", *extra])
    group = WorkerGroup("export-test", 1, 1, 0, "PACK", worker_env(1), timeout_s=300)
    try:
        address, port = group.rendezvous()
        group.construct(SFTLearner, [{"recipe": recipe, "rank": 0, "world_size": 1, "master_addr": address,
                                      "master_port": port, "total_steps": 10}])
        losses = [group.call("train_step")[0]["lm_loss"] for _ in range(3)]
        input_ids = torch.randint(3, 1000, (2, 40))
        trained = group.call("logits", input_ids)[0]
        group.call("export_hf", str(tmp_path))
    finally:
        group.shutdown()

    from transformers import AutoModelForCausalLM

    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.dtype == (torch.bfloat16 if "deepspeed.precision=bf16" in extra else torch.float32)
    with torch.no_grad():
        reloaded = model(input_ids=input_ids, use_cache=False).logits.float()
    # Full weights reload bit for bit. Merged LoRA computes (W + BA)x where training computed Wx + B(Ax):
    # the same function, rounded differently in fp32, so it gets float tolerance.
    tolerance = 1e-5 if lora else 0.0
    torch.testing.assert_close(reloaded, trained, rtol=tolerance, atol=tolerance)
    if lora:
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
