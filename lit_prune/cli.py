"""Command line: ``python -m lit_prune {fit,validate,test} -c CONFIG`` (LightningCLI), plus ``export`` and ``assets``.

- ``fit|validate|test|predict``: LightningCLI; the stage is chosen by ``model.class_path`` and the model id is
  linked once into ``data.tokenizer``.
- ``export --model M --mask mask.json --out DIR``: apply a mask to a model and write a vanilla smaller checkpoint.
- ``quantize --model DIR --method M --out DIR``: weight-quantize a (pruned) model with torchao or bitsandbytes.
- ``evaluate --models dense=M pruned=DIR ...``: perplexity (and lm-eval accuracy) side by side, with retention.
- ``cache-teacher``: write a dense teacher's top-K logits for the training blocks (offline KD).
- ``assets``: prepare the offline models, corpus and benchmark tasks and print where they are.
"""

from __future__ import annotations

import argparse
import sys

import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_prune.data import PruneDataModule
from lit_prune.stages import PruneStage

EXTRA_COMMANDS = ("export", "assets", "cache-teacher", "evaluate", "quantize")


class LitPruneCLI(LightningCLI):
    """``python -m lit_prune {fit,validate,test} -c configs/<method>_<model>.yaml``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One checkpoint id feeds both the weights (model) and the tokenizer (data).
        parser.link_arguments("model.init_args.pretrained", "data.tokenizer")


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune export",
        description="Apply a mask.json to a model and write the smaller model as a vanilla HF checkpoint.",
    )
    parser.add_argument("--model", required=True, help="Dense model: hub id, local folder, or offline:smollm2-135m.")
    parser.add_argument("--mask", required=True, help="mask.json (from any method, or written by hand).")
    parser.add_argument("--out", required=True, help="Output folder (must be empty or new).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--allow-model-mismatch", action="store_true", help="Accept a mask made for another model id.")
    parser.add_argument("--compensate", choices=["linear"], default=None,
                        help="Training-free: fold a least-squares map into the layer before each cut.")
    parser.add_argument("--calib-text", nargs="+", default=["offline:britannica"],
                        help="Calibration text files or offline corpora (their last 10%% is never read).")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="Calibration tokens for --compensate.")
    parser.add_argument("--ridge", type=float, default=0.0, help="Relative ridge of the least squares (0: none).")
    args = parser.parse_args(argv)
    from lit_prune.components.checkpoint import export_from_mask
    from lit_prune.components.mask_io import load_mask

    artifact = load_mask(args.mask)
    out = export_from_mask(args.model, artifact, args.out, args.overwrite, args.dtype, args.allow_model_mismatch,
                           args.compensate, tuple(args.calib_text), args.calib_tokens, args.ridge)
    print(f"{artifact.describe()}\nwrote {out}")
    if args.compensate:
        for seg in load_mask(f"{out}/mask.json").extra["compensation"]["segments"]:
            before, after = seg["calib_relative_error"]
            start, end = seg["segment"]
            print(f"segment [{start}, {end}): map folded into layer {seg['folded_into_layer']}; calibration "
                  f"relative error {before:.4f} -> {after:.4f}")


def quantize_main(argv: list[str]) -> None:
    from lit_prune.components.quantize import METHODS, quantize_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m lit_prune quantize",
        description="Quantize the weights of a (pruned or recovered) model and write it as an HF checkpoint that "
        "reloads with from_pretrained. Methods: "
        + "; ".join(f"{m.name} ({'/'.join(m.devices)}, lit_prune[{m.extra}]): {m.description}"
                    for m in METHODS.values()),
    )
    parser.add_argument("--model", required=True, help="Float model: exported folder, hub id, or offline:smollm2-135m.")
    parser.add_argument("--method", required=True, help=f"One of: {', '.join(METHODS)}.")
    parser.add_argument("--out", required=True, help="Output folder (must be empty or new).")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Float dtype of what stays unquantized and of the compute (auto: the checkpoint's; "
                        "bfloat16 for bnb).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    args = parser.parse_args(argv)
    report = quantize_checkpoint(args.model, args.method, args.out, args.device, args.dtype, args.overwrite)
    before = report["source_weight_bytes_on_disk"]
    after = report["weight_bytes_on_disk"]
    ratio = f" ({after / before:.2f}x of {before / 1e6:.1f} MB)" if before else ""
    print(f"{args.method} on {report['device']}: {report['quantized_linear']} Linear layers quantized, "
          f"{report['float_linear']} left in {report['dtype']}\nweights on disk {after / 1e6:.1f} MB{ratio}\n"
          f"wrote {report['out']}")


def assets_main(argv: list[str]) -> None:
    from lit_prune.assets import assets_main as prepare_assets

    prepare_assets(argv)


def main(args: ArgsType = None) -> LitPruneCLI | None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        try:
            from lit_prune.evaluate_models import evaluate_main
            from lit_prune.teacher_cache_cli import cache_teacher_main

            commands = {"export": export_main, "assets": assets_main, "cache-teacher": cache_teacher_main,
                        "evaluate": evaluate_main, "quantize": quantize_main}
            commands[argv[0]](argv[1:])
        except (ValueError, FileExistsError, RuntimeError) as err:
            # Input errors are the user's to fix: show the message, not a traceback.
            if args is not None:
                raise
            sys.exit(f"error: {err}")
        return None
    try:
        return LitPruneCLI(
            PruneStage,
            PruneDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            args=args,
            # Runs with a logger get their own version folder; without one, re-runs would otherwise refuse to start.
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "epilog": "Other commands: `python -m lit_prune export --help`, `python -m lit_prune evaluate --help`, "
                "`python -m lit_prune cache-teacher --help`, `python -m lit_prune quantize --help`, "
                "`python -m lit_prune assets`."
            },
        )
    except torch.OutOfMemoryError as err:
        message = out_of_memory_message(argv)
        if args is not None:
            raise RuntimeError(message) from err
        sys.exit(f"error: {message}\n({str(err).splitlines()[0]})")


def out_of_memory_message(argv: list[str]) -> str:
    """What to change when a step does not fit, with the run's own batch settings where the command line has them."""
    given = [a for a in argv if a.startswith(("--data.batch_size", "--data.max_length", "--trainer.devices"))]
    return (
        "The device ran out of memory" + (f" with {' '.join(given)}" if given else "") + ". A step holds batch_size x "
        "max_length tokens of activations (and the KL over the vocabulary for each). Lower `data.batch_size` and "
        "raise `trainer.accumulate_grad_batches` to keep the effective batch; enable activation checkpointing "
        "(`model.init_args.gradient_checkpointing: true`, or the FSDP strategy's `activation_checkpointing_policy`); "
        "for MaskSearch set `model.init_args.kl_chunk_tokens` (e.g. 4096); or shard over more GPUs with FSDP. "
        "docs/scale.md lists the largest batches measured on an 80 GB GPU."
    )
