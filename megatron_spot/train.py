"""SPoT training entry point.

    torchrun --nproc-per-node N -m megatron_spot.train --config examples/qwen3_8b_spot.yaml [key=value ...]

Reads a YAML recipe (megatron_spot.config.TrainConfig) plus dotted overrides, checks the inputs
(pack, tokenizer, checkpoint, reference log-probs, layout) before starting anything, then trains with
Megatron-Core's pipeline schedules, logs metrics, checkpoints atomically and exports an HF checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from megatron_spot.config import ConfigError, TrainConfig, dump_config, load_config
from megatron_spot.training.inputs import expected_tokenizer_hash, resolve_model  # noqa: F401 (resolve_model: API)

log = logging.getLogger("megatron_spot.train")


class TrainingDiverged(RuntimeError):
    pass


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _check_output_dir(path: str) -> None:
    """run.output_dir must be a folder we can create and write, checked before any rank starts."""
    if not path:
        raise ConfigError("run.output_dir is not set")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"run.output_dir={path} exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir={path}: {probe} is not writable")


def _check_optimizer(cfg: TrainConfig) -> None:
    o = cfg.optimizer
    if o.name != "adam":
        raise ConfigError(f"optimizer.name={o.name!r}: only 'adam' (AdamW) is supported")
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr={o.lr} must be positive")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} must lie in [0, optimizer.lr={o.lr}]")
    if not 0 <= o.warmup_fraction <= 1:
        raise ConfigError(f"optimizer.warmup_fraction={o.warmup_fraction} must lie in [0, 1]")
    if o.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optimizer.lr_schedule={o.lr_schedule!r}: choose cosine, linear or constant")
    for key in ("weight_decay", "clip_grad", "adam_eps"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must not be negative")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1):
        raise ConfigError(f"optimizer.adam_beta1/adam_beta2 must lie in [0, 1), got {o.adam_beta1}, {o.adam_beta2}")


def _check_loss(cfg: TrainConfig) -> None:
    from megatron_spot.losses.objectives import parse_objective

    try:
        parse_objective(cfg.loss.objective)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"loss.objective: {exc}") from None
    if not cfg.loss.beta > 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta} must be positive")
    if not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={cfg.loss.label_smoothing} must lie in [0, 0.5)")


def _check_run(cfg: TrainConfig) -> None:
    r = cfg.run
    if not r.collective_timeout_s > 0:
        raise ConfigError(f"run.collective_timeout_s={r.collective_timeout_s} must be positive")
    for key in ("step_timeout_s", "startup_timeout_s"):
        if getattr(r, key) < 0:
            raise ConfigError(f"run.{key}={getattr(r, key)} must not be negative (0 turns the watchdog bound off)")


def _checkpoint_to_resume(cfg: TrainConfig):
    """The checkpoint run.load names (None: start fresh). run.load=auto: the newest complete checkpoint
    of run.output_dir, if there is one (an automatic restart resumes; a first start starts fresh)."""
    from megatron_spot.checkpoint.training_state import checkpoint_root, latest_checkpoint

    if not cfg.run.load:
        return None
    if cfg.run.load == "auto":
        resume = latest_checkpoint(cfg.run.output_dir) if os.path.isdir(cfg.run.output_dir) else None
        pointer = os.path.join(checkpoint_root(cfg.run.output_dir), "latest")
        if resume is None and os.path.exists(pointer):  # never silently restart over a run's history
            raise ConfigError(f"run.load=auto: {pointer} names a checkpoint that is missing or incomplete; "
                              "fix it or pass run.load=<checkpoint> explicitly")
        log.info("run.load=auto: %s", f"resuming from {resume}" if resume else
                 f"no checkpoint in {cfg.run.output_dir}, starting fresh")
        return resume
    resume = latest_checkpoint(cfg.run.load)
    if resume is None:
        raise ConfigError(f"run.load={cfg.run.load}: no complete checkpoint there")
    return resume


def preflight(cfg: TrainConfig, world_size: int):
    """Every check that needs no process group: fail before any rank allocates anything."""
    from megatron_spot.checkpoint.training_state import verify_training_checkpoint
    from megatron_spot.data import PairDataset
    from megatron_spot.platform.device import transformer_engine_available
    from megatron_spot.platform import Layout
    from megatron_spot.platform.layout import check_stated_world
    from megatron_spot.training.plan import plan_run, validate_packing
    from megatron_spot.training.reference import load_ref_logps, reference_identity

    # the recipe's world: before the layout rules (a wrong world is what a layout error would then be about)
    shape_warning = check_stated_world(cfg.world, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None)
    if shape_warning and int(os.environ.get("RANK", "0")) == 0:
        log.warning(shape_warning)
    Layout.from_config(cfg.parallel, world_size)  # the world-size rules first: they need no files
    _check_optimizer(cfg)
    _check_loss(cfg)
    _check_run(cfg)
    _check_output_dir(cfg.run.output_dir)
    resume = _checkpoint_to_resume(cfg)
    if resume:
        verify_training_checkpoint(resume)  # corrupt files: one line naming the file, nothing written
    model_cfg, weights = resolve_model(cfg, resume)
    plan = plan_run(cfg, world_size, model=model_cfg)
    if not cfg.data.pack:
        raise ConfigError("data.pack is not set: pack pairs with tools/pack_pairs.py and pass data.pack=<prefix>")
    tok_dir = cfg.data.tokenizer or weights
    expected = expected_tokenizer_hash(cfg, weights)
    # verify_data: the .bin's sha256 against the manifest (a flipped byte), then every id < vocab
    dataset = PairDataset(cfg.data.pack, expected_tokenizer_hash=expected, verify_data=True)
    dataset.check_token_ids(model_cfg.vocab_size)
    longest = int(dataset.lengths().max())
    if longest > cfg.data.seq_length:
        raise ConfigError(f"{cfg.data.pack}: the longest pair has {longest} tokens > data.seq_length="
                          f"{cfg.data.seq_length}; raise data.seq_length or repack with a smaller --max-length")
    if longest > model_cfg.max_position_embeddings:
        raise ConfigError(f"pairs of {longest} tokens exceed the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    validate_packing(cfg, dataset, te_available=transformer_engine_available())
    if cfg.data.global_batch_size > len(dataset):
        raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} is larger than the {len(dataset)} "
                          f"pairs of {cfg.data.pack}; lower it or pack more pairs")
    ref = None
    if not cfg.loss.online_reference:
        # references belong to the starting model (also when resuming), by weights content
        identity = reference_identity(cfg.model.init_checkpoint, dataset.tokenizer_hash)
        ref = load_ref_logps(cfg.data.pack, dataset.fingerprint, len(dataset), cfg.data.ref_logprobs, identity=identity)
    return model_cfg, weights, resume, dataset, ref, tok_dir, plan


def run(cfg: TrainConfig) -> dict:
    """Preflight, start the process groups and the step watchdog, train (every rank calls it)."""
    from megatron_spot.platform import initialize
    from megatron_spot.platform.watchdog import StepWatchdog

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    model_cfg, weights, resume, dataset, ref, tok_dir, plan = preflight(cfg, world_size)

    info = initialize(cfg.parallel, seed=cfg.run.seed, collective_timeout_s=cfg.run.collective_timeout_s,
                      patient_timeout_s=max(cfg.run.startup_timeout_s, cfg.run.step_timeout_s))
    watchdog = StepWatchdog(info.rank, info.world_size, cfg.run.output_dir, cfg.run.step_timeout_s,
                            cfg.run.startup_timeout_s).start()
    try:
        return _train(cfg, info, watchdog, model_cfg, weights, resume, dataset, ref, tok_dir, plan)
    finally:
        watchdog.stop()  # also when run() raises: a caller that goes on (tests) must not be shot later


def _train(cfg: TrainConfig, info, watchdog, model_cfg, weights, resume, dataset, ref, tok_dir, plan) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron_spot.checkpoint.training_state import load_training_state, save_training_checkpoint
    from megatron_spot.data import PairBatchSampler
    from megatron_spot.platform import patient_barrier
    from megatron_spot.profiling.flops import train_flops_per_token
    from megatron_spot.profiling.hardware import gpu_peak_tflops
    from megatron_spot.training.batches import step_micro_batches
    from megatron_spot.training.engine import Engine, is_finite
    from megatron_spot.training.fault_injection import arm_test_fault
    from megatron_spot.training.metrics import MetricsLogger

    run_dir = cfg.run.output_dir
    if info.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    num_mb = plan.micro_batches_per_step
    sampler = PairBatchSampler(dataset.lengths(), cfg.data.micro_batch_size, num_mb, info.dp_rank, info.dp,
                               seed=cfg.run.seed, shuffle=cfg.data.shuffle, bucket_by_length=cfg.data.bucket_by_length)
    steps_per_epoch = len(sampler)
    total = steps_per_epoch * cfg.run.epochs
    if cfg.run.train_steps:
        total = min(total, cfg.run.train_steps)

    from megatron_spot.checkpoint.hf_convert import convert_mcore_to_hf
    from megatron_spot.checkpoint.model_checkpoint import load_model_checkpoint

    def loader(ckpt):
        return (lambda chunks: load_model_checkpoint(chunks, ckpt)) if ckpt else None

    engine = Engine(cfg, model_cfg, total, load_weights=loader(weights))
    reference = None
    if cfg.loss.online_reference:  # a frozen copy of the starting model, not of the resumed policy
        reference = Engine(cfg, model_cfg, total, trainable=False, load_weights=loader(cfg.model.init_checkpoint))
    step = 0
    arm_test_fault(engine.model, info.rank, lambda: step + 1)  # tests only: MEGATRON_SPOT_TEST_FAULT
    if resume:
        state = load_training_state(resume, engine)
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
        log.info("resumed from %s at step %d (epoch %d)", resume, step, sampler.epoch)
    full_recompute = cfg.recompute.granularity == "full"
    logger = MetricsLogger(run_dir, info.world_size, enabled=info.rank == 0, start_step=step,
                           flops_per_token=lambda seq: train_flops_per_token(model_cfg, seq, full_recompute),
                           peak_tflops=gpu_peak_tflops(bool(cfg.precision.fp8)), tensorboard=cfg.run.tensorboard)
    if info.rank == 0:
        log.info("training %s: %d pairs, %d steps/epoch x %d epochs -> %d steps, %d micro-batches x %d pairs "
                 "per rank per step, %s", model_cfg.num_parameters(), len(dataset),
                 steps_per_epoch, cfg.run.epochs, total, num_mb, cfg.data.micro_batch_size,
                 info.layout.describe() if info.layout else f"world {info.world_size} (TP{info.tp} PP{info.pp} DP{info.dp})")
        if engine.experts_module:
            log.info("experts: %d per MoE layer, run by %s (moe.experts=%s)", model_cfg.num_moe_experts,
                     engine.experts_module, cfg.moe.experts)
    last_ckpt, history, t0 = resume, [], time.time()
    for epoch, step_in_epoch, indices in sampler.iter_epochs(cfg.run.epochs):
        if step >= total:
            break
        mbs = step_micro_batches(cfg, dataset, sampler, epoch, step_in_epoch, indices, info.device, info.dp_rank,
                                 ref_logps=ref, pipeline_parallel=info.pp)
        if reference is not None:
            for mb, seq in zip(mbs, reference.sequence_logps(mbs)):
                mb["ref_logps"] = seq.float()
        metrics = engine.train_step(mbs)
        step += 1
        watchdog.progress(step)
        if metrics.get("nonfinite") or not is_finite(metrics["loss"]):
            what = f"loss is {metrics['loss']}" if not is_finite(metrics["loss"]) else "the gradients are not finite"
            msg = (f"{what} at step {step} (epoch {epoch}); stopped before applying the update, nothing was "
                   f"saved. The last good checkpoint is {last_ckpt or 'none'}; lower optimizer.lr or check the data.")
            log.error(msg)
            raise TrainingDiverged(msg)
        mean_len = float(np.mean([mb["mean_sequence_length"] for mb in mbs]))
        metrics = logger.enrich(metrics, mean_len)
        metrics["epoch"] = epoch
        history.append({"step": step, **metrics})
        if step % cfg.run.log_interval == 0 or step == total:
            logger.log(step, total, metrics)
        if (cfg.run.save_interval and step % cfg.run.save_interval == 0) or step == total:
            if not engine.weights_finite():  # never let a poisoned model become "the last good"
                msg = (f"the weights are not finite after step {step}; not saving. The last good checkpoint "
                       f"is {last_ckpt or 'none'}; lower optimizer.lr or check the data.")
                log.error(msg)
                raise TrainingDiverged(msg)
            watchdog.phase(f"saving checkpoint step {step}")
            last_ckpt = save_training_checkpoint(
                run_dir, step, engine, {"sampler": sampler.state_dict(), "epoch": sampler.epoch,
                                        "config": cfg.__class__.__name__}, tokenizer_dir=tok_dir)
            watchdog.progress(step)
            if info.rank == 0:
                log.info("saved checkpoint %s", last_ckpt)
    logger.close()
    summary = {"steps": step, "seconds": time.time() - t0, "checkpoint": last_ckpt, "history": history}
    if engine.experts_module:
        summary["experts_module"] = engine.experts_module
    hf_dir = None
    if cfg.run.export_hf and last_ckpt:
        watchdog.phase("the Hugging Face export")
        dist.barrier()
        if info.rank == 0:
            hf_dir = os.path.join(run_dir, "hf")
            log.info("exporting the policy as a Hugging Face checkpoint to %s", hf_dir)
            # inside a multi-rank world the converter runs itself in a fresh one-process child
            convert_mcore_to_hf(os.path.join(last_ckpt, "model"), hf_dir, progress=False, overwrite=True)
        patient_barrier()  # the others wait for rank 0's export longer than a collective may take
    summary["hf_export"] = hf_dir
    if info.rank == 0:
        from megatron_spot.utils.atomic import write_json_atomic

        write_json_atomic(os.path.join(run_dir, "summary.json"), summary, default=str)
    torch.distributed.barrier()
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_spot.train",
        description="Train a policy (Qwen3, Qwen3-MoE, Llama 3.x) with SPoT objectives on packed pairs (Megatron-Core TP/PP/DP/EP). "
                    "Launch with torchrun for several processes.",
        epilog="Overrides are dotted keys, e.g. parallel.tensor_parallel=2 loss.objective=spot-bco:1,sft:0.1 "
               "run.train_steps=10. See megatron_spot/config/schema.py for every key.",
    )
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the YAML file")
    args = parser.parse_args(argv)
    from megatron_spot.checkpoint.errors import CheckpointSaveError
    from megatron_spot.data import PackFormatError, TokenizerMismatchError

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        run(cfg)
    except (ConfigError, PackFormatError, TokenizerMismatchError) as exc:
        # raised before training starts, identically on every rank
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # every rank stops at the same step (the check is collective)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CheckpointSaveError as exc:  # every rank gets the same line (the save agrees collectively)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    # Any other exception propagates: the process exits non-zero and torchrun stops the other ranks
    # (a collective shutdown here would wait forever for ranks blocked in pipeline communication).
    from megatron_spot.platform import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
