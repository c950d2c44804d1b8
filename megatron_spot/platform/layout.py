"""The parallel layout of a run, derived and validated once (torchtitan's ParallelDims idea).

``Layout.from_config(parallel, world_size)`` checks everything that needs no model and no process group
(sizes >= 1, the world divisible by TP x PP x CP and by ETP x EP x PP, VPP only with PP >= 2, CP only with
Transformer Engine on GPUs) and derives the data-parallel size of the dense layers (DP) and of the experts
(expert DP). Megatron-Core lays out two grids over the same ranks: TP x CP x DP x PP for attention and
the dense layers, ETP x EP x expert-DP x PP for the experts of MoE layers; PP is outermost in both, so
their pipeline groups coincide. Nothing else in the package divides the world size by hand:
training, scoring and profiling take ``layout.dp``. Model-specific checks (heads / KV groups by TP, layers
by PP x VPP, experts by EP) live with the model family (models/gpt/config.py GPTConfig.layout_problems) and are called by
training/plan.py's ``plan_run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_spot.config.loader import ConfigError
from megatron_spot.config.schema import ParallelConfig, WorldConfig


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: Optional[int]  # None when the pipeline is not interleaved (Megatron-Core's convention)
    cp: int
    dp: int
    world: int
    ep: int = 1  # expert parallel (MoE layers' all-to-all group)
    etp: int = 1  # tensor parallel inside each expert

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights: world / (ETP x EP x PP) (their gradients' all-reduce
        and the distributed optimizer's shards run over these groups)."""
        return self.world // (self.etp * self.ep * self.pp)

    @property
    def model_parallel(self) -> int:
        """Ranks holding one replica of the model: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def stages(self) -> int:
        """Model chunks the layers are split into: PP x VPP."""
        return self.pp * (self.vpp or 1)

    def describe(self) -> str:
        vpp = f" (VPP{self.vpp})" if self.vpp else ""
        dense = f"world {self.world} = TP{self.tp} x PP{self.pp}{vpp} x CP{self.cp} x DP{self.dp}"
        if self.ep == 1 and self.etp == self.tp:
            return dense
        return f"{dense}; experts: ETP{self.etp} x EP{self.ep} x PP{self.pp} x expert-DP{self.expert_dp}"

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int, allow_context_parallel: Optional[bool] = None
                    ) -> "Layout":
        """Validate `parallel` against `world_size` (one-line ConfigErrors naming the key) and derive DP.

        allow_context_parallel: whether CP > 1 can run here (None: ask platform.device whether CUDA is present).
        """
        tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
        ep = parallel.expert_parallel
        etp = tp if parallel.expert_tensor_parallel is None else parallel.expert_tensor_parallel
        for name, value in (("parallel.tensor_parallel", tp), ("parallel.pipeline_parallel", pp),
                            ("parallel.context_parallel", cp), ("parallel.expert_parallel", ep),
                            ("parallel.expert_tensor_parallel", etp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value} must be an integer >= 1")
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1")
        if world_size % (tp * pp * cp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel x "
                f"context_parallel = {tp} x {pp} x {cp} = {tp * pp * cp}; launch a multiple of "
                f"{tp * pp * cp} processes or change parallel.tensor_parallel/pipeline_parallel"
            )
        if world_size % (etp * ep * pp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by expert_tensor_parallel x expert_parallel x "
                f"pipeline_parallel = {etp} x {ep} x {pp} = {etp * ep * pp} (the experts' grid); change "
                "parallel.expert_parallel/expert_tensor_parallel (expert_tensor_parallel defaults to tensor_parallel)"
            )
        vpp = parallel.virtual_pipeline
        if vpp is not None and vpp < 1:
            raise ConfigError(f"parallel.virtual_pipeline={vpp} must be >= 1 (or null)")
        if vpp is not None and vpp > 1 and pp < 2:
            raise ConfigError(
                f"parallel.virtual_pipeline={vpp} needs parallel.pipeline_parallel >= 2 (got {pp}); "
                "set parallel.virtual_pipeline=null"
            )
        if cp > 1:
            if allow_context_parallel is None:
                from megatron_spot.platform.device import has_cuda

                allow_context_parallel = has_cuda()
            if not allow_context_parallel:
                raise ConfigError(
                    "parallel.context_parallel > 1 needs Transformer Engine attention on GPUs; "
                    "set parallel.context_parallel=1 on CPU"
                )
        return cls(tp=tp, pp=pp, vpp=vpp if (vpp or 1) > 1 else None, cp=cp, dp=world_size // (tp * pp * cp),
                   world=world_size, ep=ep, etp=etp)


def stated_world(world: WorldConfig) -> tuple[Optional[int], Optional[int]]:
    """(nodes, GPUs per node) a recipe's `world:` states, each None when not stated; checked >= 1."""
    for name in ("nodes", "gpus_per_node"):
        value = getattr(world, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"world.{name}={value} must be an integer >= 1 (or null: whatever the launcher gives)")
    return world.nodes, world.gpus_per_node


def check_stated_world(world: WorldConfig, world_size: int, ranks_per_node: Optional[int] = None) -> Optional[str]:
    """The recipe's `world:` against the world it was launched in, once at start-up.

    A stated world size (world.nodes x world.gpus_per_node, both given) that differs from `world_size` is a
    one-line ConfigError naming both numbers: the layout, the batch split and the predictions were made for
    the stated world. With the same world size but another shape (`ranks_per_node`: torchrun's
    LOCAL_WORLD_SIZE), or a single stated field that disagrees, the run is valid; a warning line is returned
    (EP groups may then cross nodes the recipe's prediction kept inside one). None when nothing is stated
    or everything agrees."""
    nodes, per_node = stated_world(world)
    if nodes is not None and per_node is not None and nodes * per_node != world_size:
        raise ConfigError(f"world.nodes x world.gpus_per_node = {nodes} x {per_node} = {nodes * per_node} ranks, but "
                          f"this run was launched with world size {world_size}; launch {nodes * per_node} ranks "
                          "or change the recipe's world: section")
    if not ranks_per_node or world_size % ranks_per_node:
        return None
    launched = (world_size // ranks_per_node, ranks_per_node)
    if (nodes or launched[0], per_node or launched[1]) == launched:
        return None
    return (f"the recipe's world: says {nodes or '?'} node(s) x {per_node or '?'} GPUs per node, launched as "
            f"{launched[0]} x {launched[1]}; a prediction for the recipe's world (spot-profile) does not describe "
            "this run's communication")
