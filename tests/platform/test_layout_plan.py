"""platform/layout.py's Layout and training/plan.py's plan_run: derived once, bad settings one-line errors."""
import dataclasses

import pytest

from megatron_spot.config import ConfigError, ParallelConfig, TrainConfig
from megatron_spot.models import load_model_config
from megatron_spot.platform import Layout
from megatron_spot.training.plan import plan_run


@pytest.mark.parametrize("tp, pp, vpp, cp, world, dp", [
    (1, 1, None, 1, 1, 1), (2, 2, None, 1, 8, 2), (1, 2, 2, 1, 4, 2), (2, 1, 1, 1, 4, 2), (2, 2, None, 2, 16, 2),
])
def test_layout_derives_dp(tp, pp, vpp, cp, world, dp):
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp, context_parallel=cp)
    layout = Layout.from_config(parallel, world, allow_context_parallel=True)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.world) == (tp, pp, cp, dp, world)
    assert layout.vpp == (vpp if (vpp or 1) > 1 else None)  # VPP 1 is "not interleaved"
    assert layout.model_parallel * layout.dp == world
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.dp = 3


@pytest.mark.parametrize("tp, pp, ep, etp, world, dp, expert_dp", [
    (1, 1, 2, None, 2, 2, 1), (2, 1, 2, 1, 4, 2, 2), (2, 1, 2, None, 4, 2, 1), (1, 2, 2, 1, 4, 2, 1),
    (2, 2, 4, 1, 16, 4, 2), (1, 1, 1, None, 4, 4, 4),
])
def test_layout_derives_expert_data_parallel(tp, pp, ep, etp, world, dp, expert_dp):
    """Megatron-Core's two grids: TP x CP x DP x PP for dense layers, ETP x EP x expert-DP x PP for experts;
    expert_tensor_parallel=None means ETP = TP (Megatron-Core's default)."""
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, expert_tensor_parallel=etp)
    layout = Layout.from_config(parallel, world)
    assert (layout.dp, layout.ep, layout.etp, layout.expert_dp) == (dp, ep, tp if etp is None else etp, expert_dp)
    assert layout.etp * layout.ep * layout.pp * layout.expert_dp == world


@pytest.mark.parametrize("parallel, world, match", [
    (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, "world size 6 is not divisible"),
    (ParallelConfig(expert_parallel=0), 1, r"parallel.expert_parallel=0 must be an integer >= 1"),
    (ParallelConfig(expert_tensor_parallel=0), 1, r"parallel.expert_tensor_parallel=0 must be an integer >= 1"),
    (ParallelConfig(expert_parallel=4), 2,
     r"world size 2 is not divisible by expert_tensor_parallel x expert_parallel x pipeline_parallel = 1 x 4 x 1 = 4"),
    (ParallelConfig(tensor_parallel=2, expert_parallel=2), 2,
     r"world size 2 is not divisible by expert_tensor_parallel x expert_parallel x pipeline_parallel = 2 x 2 x 1"),
    (ParallelConfig(pipeline_parallel=2, expert_parallel=2), 6,  # the dense grid fits (DP3), the experts' does not
     r"world size 6 is not divisible by expert_tensor_parallel x expert_parallel x pipeline_parallel = 1 x 2 x 2 = 4"),
    (ParallelConfig(tensor_parallel=0), 1, r"parallel.tensor_parallel=0 must be an integer >= 1"),
    (ParallelConfig(pipeline_parallel=1, virtual_pipeline=2), 1, "virtual_pipeline=2 needs parallel.pipeline_parallel >= 2"),
    (ParallelConfig(context_parallel=2), 2, "context_parallel > 1 needs Transformer Engine"),
])
def test_layout_refuses_bad_settings(parallel, world, match):
    with pytest.raises(ConfigError, match=match):
        Layout.from_config(parallel, world, allow_context_parallel=False)


def _cfg(tp=1, pp=1, vpp=None, mbs=1, gbs=8, seq=None) -> TrainConfig:
    cfg = TrainConfig()
    cfg.parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp)
    cfg.data.micro_batch_size, cfg.data.global_batch_size = mbs, gbs
    if seq is not None:
        cfg.data.seq_length = seq
    return cfg


def test_plan_run_counts_micro_batches():
    tiny = load_model_config("qwen3-tiny")
    plan = plan_run(_cfg(tp=2, mbs=2, gbs=16), world_size=4, model=tiny)
    assert plan.layout.dp == 2 and plan.micro_batches_per_step == 4 and plan.pairs_per_step == 16
    scoring = plan_run(_cfg(tp=2, gbs=3), world_size=4, model=tiny, optimizer_steps=False)
    assert scoring.micro_batches_per_step is None and scoring.layout.dp == 2  # no global batch to divide


@pytest.mark.parametrize("cfg, world, match", [
    (_cfg(mbs=2, gbs=6), 2, r"global_batch_size=6 is not a multiple of micro_batch_size x data-parallel size = 2 x 2"),
    (_cfg(pp=2, vpp=2, gbs=1), 2, "interleaved pipeline needs at least pipeline_parallel=2 micro-batches"),
    (_cfg(tp=4), 4, "tensor_parallel=4 does not divide the 2 query groups"),  # the model's fit (qwen3-tiny)
    (_cfg(pp=3, gbs=3), 3, "4 layers do not split into PP x VPP = 3 x 1"),
    (_cfg(mbs=0), 1, r"data.micro_batch_size=0 must be an integer >= 1"),
    (_cfg(seq=0), 1, r"data.seq_length=0 must be an integer >= 1"),
    (_cfg(seq=-128), 1, r"data.seq_length=-128 must be an integer >= 1"),
])
def test_plan_run_refuses(cfg, world, match):
    with pytest.raises(ConfigError, match=match):
        plan_run(cfg, world, model=load_model_config("qwen3-tiny"))


def test_a_stated_world_is_checked_against_the_launched_one():
    """world: nodes x gpus_per_node against the world size the run was launched with: another size is a
    one-line error naming the fields and both numbers; the same size in another shape, or one stated field
    the launcher contradicts, a warning; nothing stated or everything agreeing, nothing."""
    from megatron_spot.config import WorldConfig
    from megatron_spot.platform.layout import check_stated_world

    with pytest.raises(ConfigError) as exc:
        check_stated_world(WorldConfig(nodes=8, gpus_per_node=8), 16, ranks_per_node=8)
    msg = str(exc.value)
    assert "world.nodes x world.gpus_per_node = 8 x 8 = 64" in msg and "world size 16" in msg and "\n" not in msg
    assert check_stated_world(WorldConfig(nodes=8, gpus_per_node=8), 64, ranks_per_node=8) is None
    assert check_stated_world(WorldConfig(nodes=8, gpus_per_node=8), 64) is None  # no LOCAL_WORLD_SIZE: size only
    assert check_stated_world(WorldConfig(), 3, ranks_per_node=3) is None  # null: whatever the launcher gives
    assert check_stated_world(WorldConfig(gpus_per_node=8), 16, ranks_per_node=8) is None
    shape = check_stated_world(WorldConfig(nodes=8, gpus_per_node=8), 64, ranks_per_node=4)
    assert "8 node(s) x 8 GPUs per node, launched as 16 x 4" in shape
    assert "launched as 2 x 8" in check_stated_world(WorldConfig(nodes=1), 16, ranks_per_node=8)
    with pytest.raises(ConfigError, match=r"world.gpus_per_node=0 must be an integer >= 1"):
        check_stated_world(WorldConfig(nodes=1, gpus_per_node=0), 8)
