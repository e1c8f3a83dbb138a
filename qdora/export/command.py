"""`qdora merge`: an adapter merged into a model people can serve (a plain checkpoint, NF4 or GGUF),
or extracted as a plain LoRA adapter (`--format lora`), with `--check`'s drift and verdict.

Its modules are imported when the command runs, so that `qdora merge --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

LORA_FORMATS = ("lora", "gguf-lora")


def add_merge(sub) -> None:
    """The `merge` subcommand's parser."""
    p = sub.add_parser("merge", help="merge an adapter into a model people can serve: plain, NF4, GGUF; or a LoRA",
                       description="Merge an adapter (qdora or PEFT format) into its base model and write it as a "
                                   "plain transformers checkpoint (sharded safetensors, config, tokenizer; the "
                                   "default), re-quantized to NF4 (a bitsandbytes 4-bit checkpoint that transformers "
                                   "loads as one), or as one GGUF file (Llama family); or extract a plain LoRA "
                                   "adapter (--format lora) that multi-LoRA servers load beside the base.")
    p.add_argument("--model", required=True, help="the base model: checkpoint folder or .gguf")
    p.add_argument("--adapter", required=True, help="adapter folder (qdora or PEFT format)")
    p.add_argument("--out", required=True, help="output folder (with --format gguf it holds model-<quant>.gguf)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "nf4", "gguf", "lora", "gguf-lora"),
                   help="safetensors: plain checkpoint of --dtype tensors; nf4: merged weights re-quantized to "
                        "bitsandbytes NF4 (blocksize 64); gguf: one GGUF file of type --quant; lora: a PEFT LoRA "
                        "adapter, the truncated SVD of each layer's exact change (--rank or --energy) "
                        "(default: safetensors)")
    p.add_argument("--rank", type=int, default=None, metavar="K", help="--format lora: the LoRA rank of every layer")
    p.add_argument("--energy", type=float, default=None, metavar="F",
                   help="--format lora: per layer, the smallest rank keeping F of the change's squared "
                        "Frobenius norm (e.g. 0.9), capped by --max-rank")
    p.add_argument("--max-rank", type=int, default=None, metavar="R", help="--format lora with --energy: the "
                                                                           "largest rank a layer gets (default 64)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="the merged tensors' dtype (nf4: of the unquantized tensors and the compute dtype; "
                        "default bfloat16); not for --format gguf, whose type is --quant")
    p.add_argument("--quant", default=None,
                   help="GGUF type (--format gguf only; default q8_0): f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0")
    p.add_argument("--double-quant", action="store_true",
                   help="--format nf4: double-quantize the NF4 scales (bitsandbytes' compress_statistics)")
    p.add_argument("--max-shard-size", default=None, help="safetensors shard size (default 2GB; not for gguf)")
    p.add_argument("--original", action="store_true",
                   help="merge onto the original weights of --model instead of their dequantized NF4 form")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="reload the export as a user would and report its drift from the adapted NF4 model on a "
                        "probe text and held-out texts, beside the same figures for the unadapted base exported "
                        "the same way (the floor the format alone costs)")
    p.add_argument("--check-json", default=None, metavar="PATH", help="also write the --check figures as JSON "
                                                                     "(implies --check)")
    p.add_argument("--check-texts", type=int, default=8, metavar="N",
                   help="held-out texts for --check (ARC-Easy and GSM8K test records; default 8)")
    p.add_argument("--max-drift", type=float, default=None, metavar="F",
                   help="--check's verdict: the export fails (exit status 1, the files kept) when its drift from the "
                        "adapted model exceeds F times the adapter's own effect (held-out texts, mean "
                        "total-variation distance; default 0.5; implies --check)")
    p.set_defaults(func=merge)


def check_options(args) -> None:
    """The format's options, checked before anything is read (ValueError with the way out)."""
    if args.format not in LORA_FORMATS:
        for flag, value in (("--rank", args.rank), ("--energy", args.energy), ("--max-rank", args.max_rank)):
            if value is not None:
                raise ValueError(f"{flag} applies to --format lora and gguf-lora only")
    if args.format in LORA_FORMATS:
        for flag, value in (("--quant", args.quant), ("--max-shard-size", args.max_shard_size)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to --format {args.format}")
        if args.double_quant or args.original:
            raise ValueError(f"{'--double-quant' if args.double_quant else '--original'} does not apply to --format "
                             f"{args.format} (the change is taken against the base the adapter was trained on)")
        if args.format == "gguf-lora" and (args.check or args.check_json or args.max_drift is not None):
            raise ValueError("--check serves the LoRA through PEFT: run it with --format lora (the same rank "
                             "extracts the same factors); --format gguf-lora needs llama.cpp to be served")
        from qdora.export.lora import check_ranks  # heavy
        check_ranks({}, args.rank, args.energy, args.max_rank)
        args.dtype = args.dtype or "float32"
    elif args.format == "gguf":
        for flag, value in (("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to --format gguf; choose the GGUF type with --quant")
        if args.double_quant:
            raise ValueError("--double-quant applies to --format nf4 only")
        args.quant = args.quant or "q8_0"
    else:
        if args.quant is not None:
            raise ValueError(f"--quant {args.quant} applies to --format gguf only (for 4-bit bitsandbytes weights "
                             "use --format nf4)")
        if args.double_quant and args.format != "nf4":
            raise ValueError("--double-quant applies to --format nf4 only")
        args.dtype = args.dtype or "bfloat16"
        args.max_shard_size = args.max_shard_size or "2GB"
    if args.check_texts < 1:
        raise ValueError(f"--check-texts {args.check_texts} must be at least 1")
    if args.max_drift is not None:
        if not args.max_drift > 0 or args.max_drift == float("inf"):
            raise ValueError(f"--max-drift {args.max_drift} must be a positive number (the default is 0.5)")
        args.check = True
    args.max_drift = 0.5 if args.max_drift is None else args.max_drift
    if args.check_json is not None:
        args.check = True
        path = Path(args.check_json)
        if path.is_dir():
            raise ValueError(f"--check-json {path} is a folder; give a file path")
        from qdora.core.safetensors_io import check_output_dir  # heavy
        check_output_dir(path.resolve().parent, "the folder of --check-json")


def judge(report: dict, args, what: str, fix: str | None = None) -> int:
    """--check's end, for every format: the verdict (into the report and --check-json), and the exit
    status (1 when the export drifts past --max-drift; its files are kept)."""
    from qdora.export.drift import verdict, write_json  # heavy
    passed, line = verdict(report, args.max_drift, **({"fix": fix} if fix else {}))
    report["verdict"] = {"passed": passed, "max_drift": args.max_drift, "line": line}
    if args.check_json:
        write_json(report, args.check_json)
        print(f"drift figures written to {args.check_json}")
    print(line)
    if passed is False:
        print(f"qdora merge: {what} failed --check (kept; see the verdict above)", file=sys.stderr)
        return 1
    return 0


def merge_lora(args, model, tokenizer, base_path) -> int:
    """`qdora merge --format lora`: extract, write, and with --check serve it through PEFT and judge it."""
    import torch  # heavy

    from qdora.export.lora import extract_lora, lora_drift_report, save_lora  # heavy
    extraction = extract_lora(model, rank=args.rank, energy=args.energy, max_rank=args.max_rank, progress=True)
    if args.format == "gguf-lora":
        from qdora.export.lora import save_gguf_lora  # heavy
        out = save_gguf_lora(extraction, model.config, args.out, dtype=getattr(torch, args.dtype),
                             overwrite=args.overwrite)
        print(f"LoRA GGUF ({extraction.summary()}) written to {out}")
        return 0
    out = save_lora(extraction, args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite,
                    base_model_name_or_path=str(base_path))
    print(f"LoRA adapter ({extraction.summary()}) written to {out}")
    vllm = extraction.vllm_max_lora_rank()
    print(f"serve it with PEFT, or vLLM: --enable-lora --max-lora-rank {vllm}" if vllm else
          "its largest rank is above what vLLM serves (512); PEFT serves it")
    if not args.check:
        return 0
    from qdora.export.drift import format_table, held_out_texts  # heavy
    if tokenizer is None:
        print("--check needs a tokenizer next to the base model; skipped", file=sys.stderr)
        return 0
    report = lora_drift_report(model, tokenizer, out, base_path, texts=held_out_texts(args.check_texts))
    report["label"] = label = "LoRA"
    print(format_table(report, label))
    effect = report["adapter"]["held-out"]["tv_mean"]
    if effect > 0:
        kept = {who: 1 - report[who]["held-out"]["tv_mean"] / effect for who in ("adapted", "original")}
        report["effect_kept"] = kept
        print(f"the adapter's effect kept (held-out texts, 1 − drift / effect): {kept['adapted']:.1%} on the base it "
              f"was trained on, {kept['original']:.1%} on the original checkpoint")
    report["extraction"] = {"ranks": extraction.ranks, "energy_kept": extraction.kept, "seconds": extraction.seconds}
    return judge(report, args, f"the LoRA in {out}", fix="extract with a higher --rank (or --energy)")


def merge(args) -> int:
    """`qdora merge`: every check that needs no model first, then load, merge or extract, and --check."""
    import torch  # heavy

    from qdora.core.safetensors_io import check_not_an_input, check_output_dir, parse_size  # heavy
    from qdora.models.adapter_io import adapter_config, load_adapter, read_adapter  # heavy
    from qdora.models.loading import check_model_path, load_model, resolve_checkpoint  # heavy
    from qdora.models.moe import file_expert_count  # heavy: imports torch

    # Every check that needs no model first: the options, the output, the adapter, the model path,
    # and for GGUF the type, the architecture and the tokenizer.
    check_options(args)
    out = Path(args.out)
    check_not_an_input(out, {"--model": args.model, "--adapter": args.adapter})
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose a folder")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it or choose another folder")
    check_output_dir(out.resolve().parent, "the folder of --out")  # the result is built beside it, then renamed
    if args.max_shard_size is not None:
        parse_size(args.max_shard_size)
    adapter = Path(args.adapter)
    if args.format in LORA_FORMATS and (adapter / "config.json").is_file() and not any(
            (adapter / f).is_file() for f in ("qdora_adapter.json", "adapter_config.json")):
        raise ValueError(f"--adapter {adapter} is a full fine-tune (a whole model, no adapter): there is no low-rank "
                         "change to extract; serve the model itself, or merge it to --format nf4 or gguf")
    fmt, meta, modules = read_adapter(args.adapter)
    if args.original and file_expert_count(modules) is not None:
        raise ValueError("--original is not supported for an adapter on an MoE's experts; merge onto the NF4 "
                         "weights it was trained against (leave out --original)")
    if args.format in LORA_FORMATS:
        from qdora.export.lora import adapter_sides, check_experts, check_ranks  # heavy
        check_experts(modules)
        check_ranks(adapter_sides(fmt, meta, modules), args.rank, args.energy, args.max_rank)
    check_model_path(args.model)
    base_path = resolve_checkpoint(args.model)
    if args.format == "gguf":
        from qdora.export.gguf import check_export  # heavy
        check_export(base_path, args.quant)
    if args.format == "gguf-lora":
        from transformers import AutoConfig  # heavy

        from qdora.export.gguf import check_config, gguf_package  # heavy
        gguf_package()
        check_config(AutoConfig.from_pretrained(base_path))
    # Rebuild the base exactly as training quantized it: the method comes from the adapter file
    # (PEFT files do not record it; QDoRA/QLoRA on an NF4 base is assumed).
    cfg = adapter_config(fmt, meta, modules, quantized=True)
    model, tokenizer = load_model(base_path, method=cfg.method, cfg=cfg, add=False)
    load_adapter(model, args.adapter, verbose=False)
    original = base_path if args.original else None
    if args.format in LORA_FORMATS:
        return merge_lora(args, model, tokenizer, base_path)

    def export(path, adapted=True):
        """Write the model (adapted=False: without its adapters) as asked into `path`; the folder to load."""
        if args.format == "gguf":
            from qdora.export.gguf import save_gguf  # heavy
            return save_gguf(model, path, tokenizer, quant=args.quant, original_checkpoint=original,
                             overwrite=args.overwrite, adapted=adapted).parent
        if args.format == "nf4":
            from qdora.export.nf4 import save_nf4  # heavy
            return save_nf4(model, path, tokenizer, dtype=getattr(torch, args.dtype), double_quant=args.double_quant,
                            max_shard_size=args.max_shard_size, original_checkpoint=original,
                            overwrite=args.overwrite, adapted=adapted)
        from qdora.export.merge import merge_and_save  # heavy
        return merge_and_save(model, path, tokenizer=tokenizer, dtype=getattr(torch, args.dtype),
                              max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                              original_checkpoint=original, adapted=adapted)

    out = export(args.out)
    label = {"safetensors": args.dtype, "nf4": "nf4" + (" double-quant" if args.double_quant else ""),
             "gguf": f"gguf {args.quant}"}[args.format]
    print(f"merged model ({label}) written to {out}")
    if args.check:
        from qdora.export.drift import drift_report, format_table, held_out_texts  # heavy
        if tokenizer is None:
            print("--check needs a tokenizer next to the base model; skipped", file=sys.stderr)
            return 0
        report = drift_report(model, tokenizer, out, args.format, export_base=lambda p: export(p, adapted=False),
                              texts=held_out_texts(args.check_texts))
        report["label"] = label
        d = report["adapted"]["probe"]
        base = "original weights" if args.original else "dequantized NF4 weights"
        print(f"logits, merged on the {base} vs the adapted NF4 model, over {d['tokens']} tokens: "
              f"max abs {d['max_abs']:.3e} (relative {d['max_rel']:.2e}), mean abs {d['mean_abs']:.3e}")
        print(format_table(report, label))
        return judge(report, args, f"the export in {out}")
    return 0
