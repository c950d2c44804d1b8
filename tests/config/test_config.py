"""YAML + key=value overrides, typed coercion, and 'did you mean' errors."""
import pytest

from megatron_spot.config import ConfigError, TrainConfig, apply_overrides, dump_config, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("parallel:\n  tensor_parallel: 2\nloss:\n  beta: 0.2\n")
    cfg = load_config(TrainConfig, str(path), ["parallel.pipeline_parallel=2", "run.train_steps=null",
                                               "parallel.sequence_parallel=false", "optimizer.lr=2e-7"])
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (2, 2)
    assert cfg.loss.beta == 0.2 and cfg.optimizer.lr == 2e-7 and cfg.run.train_steps is None
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    assert load_config(TrainConfig, str(out)) == cfg


@pytest.mark.parametrize("override, match", [
    ("parallel.tensor_paralel=2", "did you mean 'parallel.tensor_parallel'"),
    ("optimiser.lr=1", "did you mean 'optimizer'"),
    ("parallel.tensor_parallel=two", "expects int"),
    ("parallel.sequence_parallel=maybe", "expects true/false"),
    ("loss.beta", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=f"(?i){match}"):
        apply_overrides(TrainConfig(), [override])


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match="data.micro_batch'.*micro_batch_size"):
        load_config(TrainConfig, str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))


def test_world_section(tmp_path):
    """world: is null by default (whatever the launcher gives); a recipe states nodes and GPUs per node."""
    assert (TrainConfig().world.nodes, TrainConfig().world.gpus_per_node) == (None, None)
    path = tmp_path / "r.yaml"
    path.write_text("world:\n  nodes: 8\n  gpus_per_node: 8\n")
    cfg = load_config(TrainConfig, str(path), ["world.nodes=16"])
    assert (cfg.world.nodes, cfg.world.gpus_per_node) == (16, 8)
    with pytest.raises(ConfigError, match="(?i)did you mean 'world.gpus_per_node'"):
        apply_overrides(TrainConfig(), ["world.gpus_per_nod=4"])
