"""Pack preference pairs (prompt, chosen, rejected) into a Megatron indexed dataset for SPoT training.

Writes PREFIX.bin, PREFIX.idx (Megatron-Core IndexedDataset format; one document per pair with the
sequences [prompt, chosen + EOS, rejected + EOS]) and PREFIX.manifest.json.

Examples:
  python tools/pack_pairs.py --input pairs.jsonl --preset rectify --tokenizer /models/Qwen3-8B \\
      --apply-chat-template --output-prefix data/spot_pairs
  python tools/pack_pairs.py --input train.parquet --preset spot --tokenizer tok.model --output-prefix out/p
"""
from __future__ import annotations

import argparse
import sys

from megatron_spot.cli import BAD_INPUT, INTERRUPTED, OK
from megatron_spot.cli.args import non_negative_int, positive_int


def build_parser() -> argparse.ArgumentParser:
    from megatron_spot.data.schema import PRESETS

    presets = "; ".join(f"{k}: prompt={'|'.join(v.prompt)}, chosen={'|'.join(v.chosen)}, "
                        f"rejected={'|'.join(v.rejected)}" for k, v in PRESETS.items())
    ap = argparse.ArgumentParser(
        prog="pack_pairs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 on success; 2 on bad flags or input (a number out of range, an output prefix "
               "that is a folder or cannot be written, a bad record under --strict, no pairs kept, an unreadable "
               "input, tokenizer or chat template); 130 interrupted. On failure no output files are left behind.")
    io = ap.add_argument_group("input and output")
    io.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                    help="one or more inputs: .jsonl, .json (list of records), .parquet files, folders "
                         "written by datasets' save_to_disk, folders of such files, or globs")
    io.add_argument("--split", default="train", help="split to read from a saved DatasetDict (default: train)")
    io.add_argument("--output-prefix", "-o", required=True, metavar="PREFIX",
                    help="writes PREFIX.bin, PREFIX.idx and PREFIX.manifest.json (replaced atomically)")
    fm = ap.add_argument_group("field mapping")
    fm.add_argument("--preset", choices=sorted(PRESETS), default="trl",
                    help=f"field names to read (default: trl). {presets}. rectify also accepts a "
                         f"'metadata' object. trl values may be strings or chat message lists "
                         f"(prompt may then be implicit: the shared leading messages)")
    fm.add_argument("--prompt-field", metavar="NAME[,NAME]", help="override the preset's prompt field "
                    "(comma-separated names are tried in order)")
    fm.add_argument("--chosen-field", metavar="NAME[,NAME]", help="override the preset's chosen field")
    fm.add_argument("--rejected-field", metavar="NAME[,NAME]", help="override the preset's rejected field")
    tk = ap.add_argument_group("tokenisation")
    tk.add_argument("--tokenizer", "-t", required=True, metavar="PATH",
                    help="a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json, e.g. a "
                         "model folder) or a sentencepiece .model file; its hash goes into the manifest and "
                         "training refuses a pack made with another tokenizer")
    tk.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                    help="render plain-string pairs with the chat template too (prompt as one user turn, "
                         "response as the assistant turn); on by default for --preset spot, as in the authors' "
                         "script. Without it plain strings are tokenised as they are, exactly like TRL: prompt "
                         "ids, then response ids + EOS. Message-list fields always get the chat template")
    tk.add_argument("--system-prompt", metavar="TEXT",
                    help="prepend this system message when the chat template is used")
    tk.add_argument("--chat-template-mode", choices=["authors", "non-thinking"], default=None,
                    help="how the chat template renders pairs. authors (the default for --preset spot): exactly "
                         "TRL 0.20 with the template's defaults, as the SPoT authors trained; for Qwen3 each "
                         "response starts with the empty '<think>\\n\\n</think>\\n\\n' block, which is "
                         "scored. non-thinking (the default for the other presets): enable_thinking=False, so "
                         "that block ends the prompt and is not scored. Recorded in the manifest and fingerprint")
    tk.add_argument("--chat-template", metavar="FILE",
                    help="a Jinja chat template file overriding the tokenizer's (needed for conversational "
                         "data with a sentencepiece model)")
    lp = ap.add_argument_group("length policy")
    lp.add_argument("--max-length", type=non_negative_int, default=8192,
                    help="max tokens of prompt + the longer response (default: 8192; 0 = no limit)")
    lp.add_argument("--max-prompt-length", type=non_negative_int, default=4096,
                    help="max prompt tokens (default: 4096; 0 = no limit)")
    lp.add_argument("--truncation", choices=["keep-end", "keep-start", "truncate", "drop"], default=None,
                    help="over-length pairs. The prompt always keeps its last --max-prompt-length tokens (TRL's "
                         "tokenize_row). Then, over --max-length: 'keep-end' (TRL 0.20's trainer default; the "
                         "default with --chat-template-mode authors) drops the start of the prompt, and a pair "
                         "whose response alone reaches --max-length is skipped; 'keep-start' (alias 'truncate'; "
                         "the default otherwise) keeps the start of each response; 'drop' skips the pair. All are "
                         "counted in the manifest")
    rn = ap.add_argument_group("running")
    rn.add_argument("--workers", "-j", type=positive_int, default=1,
                    help="tokeniser worker processes (default: 1, which already uses the Rust tokenizer's "
                         "threads; use about one per free core for chat-templated data)")
    rn.add_argument("--chunk-size", type=positive_int, default=512, help="records per batch sent to a worker (default: 512)")
    rn.add_argument("--strict", action="store_true",
                    help="fail on the first bad record (malformed JSON, missing/non-string fields, empty "
                         "response, chosen == rejected, over-length with --truncation drop); by default they "
                         "are counted, skipped and summarised")
    rn.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no per-record warnings")
    rn.add_argument("--show-skipped", type=non_negative_int, default=10, metavar="N",
                    help="print the first N skipped records with file:line and reason (default: 10)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_spot.data import InputError, PackError, PackFormatError, TokenizerError, pack_pairs

    from megatron_spot.utils.output_paths import OutputPathError, check_output_prefix

    try:  # before reading anything: -o dir/ would write hidden dir/.bin
        check_output_prefix(args.output_prefix, "--output-prefix")
    except OutputPathError as e:
        print(f"pack_pairs: error: {e}", file=sys.stderr)
        return BAD_INPUT
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template) as f:
                chat_template = f.read()
        except OSError as e:
            print(f"pack_pairs: error: cannot read --chat-template: {e}", file=sys.stderr)
            return BAD_INPUT
    shown = [0]

    def on_error(reason, where, message):
        if not args.quiet and shown[0] < args.show_skipped:
            shown[0] += 1
            print(f"skipped {where}: {message} [{reason}]", file=sys.stderr)

    try:
        m = pack_pairs(args.input, args.tokenizer, args.output_prefix, preset=args.preset,
                       prompt_field=args.prompt_field, chosen_field=args.chosen_field,
                       rejected_field=args.rejected_field, apply_chat_template=args.apply_chat_template,
                       system_prompt=args.system_prompt, chat_template_mode=args.chat_template_mode,
                       chat_template=chat_template, max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length, truncation=args.truncation,
                       workers=args.workers, strict=args.strict, chunk_size=args.chunk_size, split=args.split,
                       progress=not args.quiet, on_error=on_error)
    except (PackError, InputError, TokenizerError, PackFormatError, ValueError, OSError) as e:
        print(f"pack_pairs: error: {e}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("pack_pairs: interrupted; no output written", file=sys.stderr)
        return INTERRUPTED
    dt = m["seconds"]   # packing time, without Python start-up and imports
    c = m["counts"]
    pl = m["length_stats"]["pair"]
    print(f"packed {c['kept']:,} of {c['read']:,} pairs ({c['dropped']:,} skipped) into "
          f"{args.output_prefix}.{{bin,idx,manifest.json}} in {dt:.1f}s "
          f"({c['read'] / max(dt, 1e-9):,.0f} pairs/s, {m['num_tokens'] / max(dt, 1e-9):,.0f} tokens/s)")
    print(f"  tokens: {m['num_tokens']:,} ({m['dtype']}); pair length mean {pl['mean']:.0f}, p99 {pl['p99']:.0f}, "
          f"max {pl['max']}; truncated prompts {c['truncated_prompt']}, truncated responses "
          f"{c['truncated_response']}")
    skipped = {k: v for k, v in c["dropped_by_reason"].items() if v}
    if skipped:
        print("  skipped by reason: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
              + " (see the manifest's dropped_examples; --strict to fail instead)")
    print(f"  chat template mode {m['options']['chat_template_mode']}, truncation {m['options']['truncation']}"
          + (f" ({c['keep_end_shared_cut']} pairs whose shorter row TRL would give more prompt tokens)"
             if c.get("keep_end_shared_cut") else ""))
    print(f"  tokenizer {m['tokenizer_hash'][:16]}, fingerprint {m['fingerprint'][:16]}")
    return OK


if __name__ == "__main__":
    sys.exit(main())
