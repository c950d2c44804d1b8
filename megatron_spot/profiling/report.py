"""Printing and tabulating profiling results: the prediction, one measured run, and a layout sweep
(Markdown + CSV + PNG). Pure formatting of the dicts that profiling/analytical.py and profiling/runner.py
return; the command line is megatron_spot/cli/profile_throughput.py."""
from __future__ import annotations

import csv
import os
import sys

GiB = 2**30


def print_prediction(d: dict, model_cfg) -> None:
    L = d["layout"]
    experts = f" EP{L['ep']}" + (f" ETP{L['etp']}" if L.get("etp") not in (None, L["tp"]) else "") \
        if L.get("ep", 1) > 1 or L.get("etp") not in (None, L["tp"]) else ""
    print(f"Prediction: {d.get('gpu', '?')} x {d['world_size']}, TP{L['tp']} PP{L['pp']}"
          f"{' VPP' + str(L['vpp']) if L['vpp'] else ''} DP{L['dp']}{experts}, {L['dtype']}{' + FP8' if L['fp8'] else ''}, "
          f"mbs {L['micro_batch_size']} pairs x {L['num_micro_batches']} micro-batches, seq {L['seq_length']}")
    w = d.get("world")
    if w:
        print(f"  world: {w['nodes']} node(s) x {w['gpus_per_node']} GPUs = {w['size']} ({w['source']})")
    print(f"  tokens/step {d['tokens_per_step']:,}  model FLOPs/step {d['flops_per_step']:.3e}  "
          f"bubble {d['bubble_fraction']:.1%} of compute")
    if d.get("step_time_s"):
        print(f"  at {d['assumed_mfu']:.0%} of {d['peak_tflops']:.0f} TFLOP/s: step {d['step_time_s']:.3f} s, "
              f"{d['tokens_per_s']:,.0f} tokens/s ({d['tokens_per_s'] / d['world_size']:,.0f} per GPU), "
              f"{d['tflops_per_device']:.0f} model TFLOP/s per GPU")
    if d.get("all_to_all_bytes_per_rank"):
        print(f"  MoE all-to-all (dispatch + combine, forward + backward): "
              f"{d['all_to_all_bytes_per_rank'] / GiB:.2f} GiB sent per GPU per step")
        a = d.get("all_to_all")
        if a:
            print(f"    {a['intra_node_bytes'] / GiB:.2f} GiB inside the node at {a['intra_node_gb_s']:g} GB/s + "
                  f"{a['inter_node_bytes'] / GiB:.2f} GiB to other nodes at {a['inter_node_gb_s']:g} GB/s = "
                  f"{a['seconds']:.3f} s per step on the wire")
        if d.get("step_time_with_all_to_all_s"):
            print(f"  step with the all-to-all not overlapped (upper bound): {d['step_time_with_all_to_all_s']:.3f} s, "
                  f"{d['tokens_per_s_with_all_to_all']:,.0f} tokens/s")
    for st in d["memory"]["stages"]:
        print(f"  stage {st['stage']}: weights {st['weights'] / GiB:.2f} GiB, grads {st['grads'] / GiB:.2f}, "
              f"optimizer {st['optimizer'] / GiB:.2f}, activations {st['activations'] / GiB:.2f} -> "
              f"{st['total'] / GiB:.2f} GiB")


def print_report(r: dict) -> None:
    L = r["layout"]
    print(f"Measured: TP{L['tp']} PP{L['pp']}{' VPP' + str(L['vpp']) if L['vpp'] else ''} DP{L['dp']} "
          f"({r['world_size']} ranks), {L['dtype']}, mbs {L['micro_batch_size']} pairs x "
          f"{L['num_micro_batches']}, seq {L['seq_length']}")
    for s in r["steps"]:
        mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else ""
        print(f"  step {s['step']}: {s['step_time_s']:.3f} s, {s['tokens_per_s']:,.0f} tok/s "
              f"({s['tokens_per_s_per_device']:,.0f}/device), {s['tflops_per_device']:.4f} TFLOP/s/device{mfu}")
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (unknown peak; pass --gpu)"
    print(f"  mean: {r['step_time_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s "
          f"({r['tokens_per_s_per_device']:,.0f} per device), {r['tflops_per_device']:.4f} TFLOP/s per device, "
          f"MFU {mfu} vs {r['peak_source']}"
          + (f" = {r['peak_tflops_per_device']:.3f} TFLOP/s" if r.get("peak_tflops_per_device") else ""))
    sp = r["time_split_s"]
    tot = sum(sp.values()) or 1.0
    print("  time split (mean over ranks, s/step): " + ", ".join(
        f"{k[:-2]} {v:.3f} ({v / tot:.0%})" for k, v in sp.items()))
    f = r["flops_per_step"]
    if f["measured"]:
        print(f"  FLOPs/step: measured {f['measured']:.4e}, predicted {f['predicted']:.4e} "
              f"({f['measured'] / f['predicted'] - 1:+.2%}); model FLOPs {f['model']:.4e}")
    m = r["peak_memory_bytes"]
    print(f"  peak memory (max rank): measured {m['measured'] / GiB:.4f} GiB, predicted {m['predicted'] / GiB:.4f} GiB"
          f" ({m['measured_by']})")
    pr = r["predicted"]
    print(f"  predicted bubble: {pr['bubble_fraction']:.1%} of compute ({pr['bubble_share_of_step']:.1%} of the "
          f"step); measured pipeline wait {sp.get('pipeline_bubble_s', 0) / tot:.1%} of the step")
    for mr in r["memory_per_rank"]:
        print(f"    rank {mr['rank']} (tp{mr['tp_rank']} pp{mr['pp_rank']} dp{mr['dp_rank']}): weights "
              f"{mr['weights'] / 2**20:.2f} MiB, grads {mr['grads'] / 2**20:.2f}, optimizer "
              f"{mr['optimizer'] / 2**20:.2f}, activations {mr['activation_bytes'] / 2**20:.2f}, RSS "
              f"{mr['rss_bytes'] / 2**20:.0f} MiB")


def sweep_row(name, tp, pp, dp, mbs, r) -> dict:
    sp = r["time_split_s"]
    return {
        "layout": name, "tp": tp, "pp": pp, "dp": dp, "mbs": mbs,
        "step_s": round(r["step_time_s"], 4), "tokens_per_s": round(r["tokens_per_s"], 1),
        "tokens_per_s_per_device": round(r["tokens_per_s_per_device"], 1),
        "tflops_per_device": round(r["tflops_per_device"], 5), "mfu": round(r["mfu"], 4) if r.get("mfu") else None,
        "flops_measured": r["flops_per_step"]["measured"], "flops_predicted": r["flops_per_step"]["predicted"],
        "mem_measured_mib": round(r["peak_memory_bytes"]["measured"] / 2**20, 2),
        "mem_predicted_mib": round(r["peak_memory_bytes"]["predicted"] / 2**20, 2),
        "bubble_predicted": round(r["predicted"]["bubble_share_of_step"], 3),
        "bubble_measured": round(sp["pipeline_bubble_s"] / max(1e-9, sum(sp.values())), 3),
        "fwd_s": round(sp["forward_s"], 4), "bwd_s": round(sp["backward_s"], 4), "loss_s": round(sp["loss_s"], 4),
        "opt_s": round(sp["optimizer_s"], 4), "comm_s": round(sp["communication_s"], 4),
    }


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    head = ("| layout | mbs | s/step | tokens/s | tokens/s/device | TFLOP/s/device | MFU | FLOPs/step measured / "
            "predicted | peak mem MiB measured / predicted | bubble measured / predicted | fwd / bwd / loss / opt / "
            "comm s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in ok:
        fl = (f"{r['flops_measured']:.3e} / {r['flops_predicted']:.3e}" if r["flops_measured"] else
              f"- / {r['flops_predicted']:.3e}")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        body += (f"| {r['layout'].split('_')[0]} | {r['mbs']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s_per_device']:,.0f} | {r['tflops_per_device']:.4f} | {mfu} | {fl} | "
                 f"{r['mem_measured_mib']:.2f} / {r['mem_predicted_mib']:.2f} | {r['bubble_measured']:.0%} / "
                 f"{r['bubble_predicted']:.0%} | {r['fwd_s']:.3f} / {r['bwd_s']:.3f} / {r['loss_s']:.3f} / "
                 f"{r['opt_s']:.3f} / {r['comm_s']:.3f} |\n")
    for r in rows:
        if "error" in r:
            body += f"| {r['layout']} | failed: {r['error']} |\n"
    return head + body


def write_sweep_tables(rows: list[dict], out_dir: str) -> None:
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(rows))
    ok = [r for r in rows if "error" not in r]
    if ok:
        with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ok[0]))
            w.writeheader()
            w.writerows(ok)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            labels = [r["layout"].replace("_", "\n") for r in ok]
            ax[0].bar(labels, [r["tokens_per_s"] for r in ok])
            ax[0].set_ylabel("tokens/s (all ranks)")
            ax[0].set_title("throughput")
            x = range(len(ok))
            ax[1].bar([i - 0.2 for i in x], [r["mem_measured_mib"] for r in ok], 0.4, label="measured")
            ax[1].bar([i + 0.2 for i in x], [r["mem_predicted_mib"] for r in ok], 0.4, label="predicted")
            ax[1].set_xticks(list(x), labels)
            ax[1].set_ylabel("peak memory per rank (MiB)")
            ax[1].legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "plot.png"), dpi=100)
            plt.close(fig)
        except Exception as exc:  # a plot is a convenience; the tables are the result
            print(f"warning: no plot ({exc})", file=sys.stderr)
