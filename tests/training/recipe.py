"""The training tests' recipe and its independent implementation: the run's overrides, and the same recipe
trained by transformers' model (any family), torch.optim.AdamW and the SPoT / DPO formulas written out here
(tests/losses checks those formulas against TRL 0.20 itself)."""
import math

import torch

STEPS = 4
BETA = 0.5
LR = 2e-3


def overrides(ws, out, objective="spot-bco", tp=2, pp=2, extra=(), steps=STEPS):
    return [f"data.pack={ws['pack']}", f"model.init_checkpoint={ws['mcore']}", f"data.tokenizer={ws['hf']}",
            f"run.output_dir={out}", f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
            "data.micro_batch_size=2", "data.global_batch_size=8", "data.seq_length=128", "data.pad_to_multiple_of=8",
            f"loss.objective={objective}", f"loss.beta={BETA}", f"optimizer.lr={LR}", "optimizer.warmup_fraction=0.25",
            "optimizer.weight_decay=0.01", "optimizer.clip_grad=1.0", "run.epochs=1", f"run.train_steps={steps}",
            "run.export_hf=false", "run.tensorboard=false", "precision.dtype=fp32", *extra]


# ------------------------------------------------------------------------------------------------
# The independent implementation: transformers' Qwen3, torch.optim.AdamW, formulas written out here.
# ------------------------------------------------------------------------------------------------
def reference_losses(ws, objective, steps=STEPS, dp=1):
    """The recipe's per-step losses, trained in one process. dp > 1 reproduces what data parallelism changes:
    each step's pairs are those the dp ranks' samplers hand out, the gradient is their mean, and the spot-bco
    delta moves once per micro-batch slot by the mean of the dp ranks' micro-batch rewards (as TRL's
    gathered delta does), so each rank's loss sees that delta."""
    import transformers

    from megatron_spot.config import TrainConfig, load_config
    from megatron_spot.data import PairBatchSampler, PairDataset
    from megatron_spot.training.batches import make_micro_batches

    cfg = load_config(TrainConfig, None, overrides(ws, "unused", objective, steps=steps))
    model = transformers.AutoModelForCausalLM.from_pretrained(ws["hf"], torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    ds = PairDataset(ws["pack"])
    num_mb = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    samplers = [PairBatchSampler(ds.lengths(), cfg.data.micro_batch_size, num_mb, rank, dp, seed=cfg.run.seed)
                for rank in range(dp)]
    sampler = samplers[0]

    def seq_logps(batch):
        logits = model(batch["tokens"]).logits.float()
        logp = torch.log_softmax(logits, -1)
        labels = batch["labels"].clamp(min=0)
        tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * batch["loss_mask"]
        return tok.sum(-1)

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    warmup = round(0.25 * steps)

    def lr_at(step):  # linear warmup from 0, then cosine to 0 over the remaining steps
        if step < warmup:
            return LR * step / warmup
        return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    delta_sum, delta_count, losses = 0.0, 0, []
    for step, per_rank in enumerate(zip(*(s.iter_epochs(1) for s in samplers))):
        if step == steps:
            break
        ranks = [make_micro_batches(ds, indices, torch.device("cpu"), pad_to_multiple_of=8, max_length=128)
                 for (_, _, indices) in per_rank]
        if step == 0:
            with torch.no_grad():  # reference log-probs: the starting model
                refs = {}
                for (_, _, idx) in sampler.__class__(ds.lengths(), 2, 1, 0, 1, shuffle=False,
                                                     bucket_by_length=False).iter_epochs(1):
                    b = make_micro_batches(ds, idx, torch.device("cpu"), pad_to_multiple_of=8, max_length=128)[0]
                    s = seq_logps(b)
                    for k, pair in enumerate(b["pair_indices"].tolist()):
                        refs[pair] = (s[k].item(), s[2 + k].item())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad()
        step_loss = 0.0
        for slot in range(len(ranks[0])):
            rewards = []
            for mbs in ranks:
                b = mbs[slot]
                ref = torch.tensor([refs[p][0] for p in b["pair_indices"].tolist()] +
                                   [refs[p][1] for p in b["pair_indices"].tolist()], dtype=torch.float64)
                rewards.append((b["pair_indices"].numel(), BETA * (seq_logps(b).double() - ref)))
            if objective == "spot-bco":  # one value per micro-batch slot: the mean over dp ranks of their means
                delta_sum += sum(r.detach().mean().item() for _, r in rewards) / dp
                delta_count += 1
                delta = delta_sum / delta_count
            for B, r in rewards:
                r_pos, r_neg = r[:B], r[B:]
                if objective == "spot-bco":
                    loss = (-torch.nn.functional.logsigmoid(r_pos - delta)
                            - torch.nn.functional.logsigmoid(-(r_neg - delta))).mean()
                else:
                    loss = -torch.nn.functional.logsigmoid(r_pos - r_neg).mean()
                (loss / (len(ranks[0]) * dp)).backward()
                step_loss += loss.item() / (len(ranks[0]) * dp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(step_loss)
    return losses
