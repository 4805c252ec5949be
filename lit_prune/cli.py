"""Command line: ``python -m lit_prune {fit,validate,test} -c CONFIG`` (LightningCLI), plus ``export`` and ``assets``.

- ``fit|validate|test``: LightningCLI; the stage is chosen by ``model.class_path`` and the model id is
  linked once into ``data.tokenizer``.
- ``export --model M --mask mask.json --out DIR``: apply a mask to a model and write a vanilla smaller checkpoint.
- ``quantize --model DIR --method M --out DIR``: weight-quantize a (pruned) model with torchao or bitsandbytes.
- ``evaluate --models dense=M pruned=DIR ...``: perplexity (and lm-eval accuracy) side by side, with retention.
- ``cache-teacher``: write a dense teacher's top-K logits for the training blocks (offline KD).
- ``assets``: prepare the offline models, corpus and benchmark tasks and print where they are.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_prune._warnings import quiet_third_party
from lit_prune.callbacks.progress import step_progress_bar
from lit_prune.cli_errors import (
    INPUT_ERRORS,
    debug,
    exit_with,
    explain_parse_error,
    first_missing,
    one_line_argparse_errors,
    remove_if_left_empty,
    suggest,
)
from lit_prune.data import PruneDataModule
from lit_prune.stages import PruneStage

EXTRA_COMMANDS = ("export", "assets", "cache-teacher", "evaluate", "quantize")


class LitPruneCLI(LightningCLI):
    """``python -m lit_prune {fit,validate,test} -c configs/<method>_<model>.yaml``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One checkpoint id feeds both the weights (model) and the tokenizer (data).
        parser.link_arguments("model.init_args.pretrained", "data.tokenizer")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No stage has a predict step: `predict` is not offered (generation: scripts/generate.py on an export).
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # The fit bar counts steps against max_steps (Lightning's reads "Epoch 0/-2" in step-based runs).
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, step_progress_bar()]
        if self.subcommand == "fit":
            callbacks = [*callbacks, ResumeHint(getattr(self, "_argv", []))]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        given = sys.argv[1:] if args is None else args
        self._argv = [str(a) for a in given] if isinstance(given, (list, tuple)) else []
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # only raised when main() handles errors (exit_on_error=False)
            raise CommandLineError(explain_parse_error(str(err), parser, self._argv)) from err

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._checkpoint = read_checkpoint(str(ckpt_path)) if ckpt_path else None
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # The stages load weights in configure_model: everything checked here fails in seconds, not after the load.
        if self.subcommand == "fit":
            optimizer = self.config[self.subcommand].model.init_args.get("optimizer")
            check_optimizer(self.model, getattr(optimizer, "class_path", None) or str(optimizer))
        held_out = getattr(self.datamodule, "hparams", {}).get("val_fraction")
        if self.subcommand in ("validate", "test") and held_out == 0:
            raise ValueError(f"`data.val_fraction` is 0, so `{self.subcommand}` has no held-out blocks to score. Set "
                             "it in (0, 1), e.g. --data.val_fraction=0.1 (the last 10% of the text).")
        if getattr(self, "_checkpoint", None) is not None:
            ckpt_path = self.config[self.subcommand].ckpt_path
            check_checkpoint_matches(ckpt_path, self._checkpoint, self.model)

    def before_validate(self) -> None:
        mask = getattr(self.model, "mask", None)
        if mask is not None and hasattr(mask, "describe"):
            how = "removed by surgery" if getattr(self.model, "mask_mode", "drop") == "drop" else "gated off"
            print(f"mask {self.config[self.subcommand].model.init_args.mask}: {mask.describe()}; "
                  f"layers {list(mask.drop)} {how}", flush=True)

    before_test = before_validate

    def after_validate(self) -> None:
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "log_dir", None) and self.trainer.is_global_zero:
            print(f"logs: {logger.log_dir}  (tensorboard --logdir {logger.save_dir})")

    after_test = after_validate
    after_fit = after_validate

    def _run_subcommand(self, subcommand: str) -> None:
        # A run that fails on its input leaves no version_N folder holding only an events file behind.
        logger = self.trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        created = first_missing(log_dir)
        try:
            super()._run_subcommand(subcommand)
        except INPUT_ERRORS:
            if self.trainer.is_global_zero:
                remove_if_left_empty(log_dir, created)
            raise


class ResumeHint(Callback):
    """On Ctrl+C during fit: save a checkpoint of the step reached and print the command that resumes from it."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = []  # the command without its old --ckpt_path (as `--ckpt_path=P` or `--ckpt_path P`)
        skip = False
        for arg in argv:
            if not skip and not arg.startswith("--ckpt_path"):
                self.argv.append(arg)
            skip = arg == "--ckpt_path"

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        step = f"step {trainer.global_step}" + (f" of {trainer.max_steps}" if trainer.max_steps > 0 else "")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or trainer.global_step == 0:
            why = "checkpointing is off (trainer.enable_checkpointing)" if checkpoint is None else "no step finished"
            rank_zero_info(f"Interrupted at {step}; {why}, so there is nothing to resume from.")
            return
        folder = Path(checkpoint.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        path = folder / f"interrupted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        command = " ".join(shlex.quote(a) for a in ["python", "-m", "lit_prune", *self.argv, f"--ckpt_path={path}"])
        rank_zero_info(f"Interrupted at {step}; saved {path}\nResume with:\n  {command}")


class CommandLineError(ValueError):
    """A command line jsonargparse rejected, explained on one line."""


def check_optimizer(stage: torch.nn.Module, name: str) -> None:
    """Build the configured optimizer over one dummy parameter, so torch's own range checks run before weights load."""
    factory = getattr(stage, "optimizer_factory", None)
    if factory is None:
        return
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        words = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "weight_decay": "weight_decay",
                 "momentum": "momentum", "dampening": "dampening"}
        key = next((k for w, k in words.items() if w in str(err)), None)
        where = f"model.init_args.optimizer.init_args.{key}" if key else "model.init_args.optimizer.init_args"
        raise ValueError(f"`{where}`: {name} rejects it: {err}. Fix that value in the config or on the command "
                         f"line (e.g. --{where}=...); lr, eps and weight_decay must be >= 0, betas in [0, 1)."
                         ) from None


def read_checkpoint(ckpt_path: str) -> dict | None:
    """The ``--ckpt_path`` file, memory-mapped; None for Lightning's special values and remote paths."""
    if ckpt_path in ("best", "last", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"`--ckpt_path` {ckpt_path} does not exist. Pass a .ckpt file of a run of this config "
                                "(runs/.../version_N/checkpoints/*.ckpt), or start without --ckpt_path.")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, or not a checkpoint at all
        detail = str(err).split(". ")[0] if str(err) else type(err).__name__
        raise ValueError(f"`--ckpt_path` {ckpt_path} cannot be read as a checkpoint ({detail}). Is the file complete "
                         "(a copy or a save that was cut short)? Pass another checkpoint of this run, or start without "
                         "--ckpt_path.") from None


def check_checkpoint_matches(ckpt_path: str, checkpoint: dict, stage: torch.nn.Module) -> None:
    """Refuse, before weights load, a ``--ckpt_path`` written by another stage or gate than this run's."""
    saved = set(checkpoint.get("state_dict", {}))
    # What this stage holds before weights load (gates, buffers); the frozen model is never in our checkpoints.
    expected = {k for k in stage.state_dict() if not k.startswith("model.")}
    if not expected:
        return
    roots = {k.split(".")[0] for k in expected}
    missing = sorted(expected - saved)
    unexpected = sorted(k for k in saved - expected if k.split(".")[0] in roots)
    if missing or unexpected:
        config = Path(ckpt_path).parent.parent / "config.yaml"
        made_by = f" (the config it was made with: {config})" if config.is_file() else ""
        raise ValueError(
            f"`--ckpt_path` {ckpt_path} was written by another stage or gate than this run's "
            f"{type(stage).__name__}: it holds {unexpected[:3] or 'no'} where this run expects {missing[:3] or 'no'} "
            f"extra keys. Resume with the config that made it{made_by}, or start without --ckpt_path.")


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


def main(args: ArgsType = None, exit_on_error: bool | None = None) -> LitPruneCLI | None:
    """Run a command. A bad input exits with one ``error:`` line and code 2 when called from the command line (or
    with ``exit_on_error=True``); in-process callers get the exception. ``LIT_PRUNE_DEBUG=1``: always the exception."""
    quiet_third_party()  # before any model loads: torchao comes in with transformers' quantizers
    argv = list(sys.argv[1:] if args is None else args)
    handle = (args is None if exit_on_error is None else exit_on_error) and not debug()
    commands = (*LitPruneCLI.subcommands(), *EXTRA_COMMANDS)
    if handle and argv and not argv[0].startswith("-") and argv[0] not in commands:
        exit_with(f"{argv[0]!r} is not a command. Commands: {', '.join(commands)}.{suggest(argv[0], commands)}")
    if argv and argv[0] in EXTRA_COMMANDS:
        out = option_value(argv, "--out")
        created = first_missing(out)
        try:
            from lit_prune.evaluate_models import evaluate_main
            from lit_prune.teacher_cache_cli import cache_teacher_main

            commands = {"export": export_main, "assets": assets_main, "cache-teacher": cache_teacher_main,
                        "evaluate": evaluate_main, "quantize": quantize_main}
            with one_line_argparse_errors() if handle else contextlib.nullcontext():
                commands[argv[0]](argv[1:])
        except (*INPUT_ERRORS, RuntimeError) as err:
            remove_if_left_empty(out, created)  # a failed command leaves no empty --out folder
            # Input errors are the user's to fix: show the message, not a traceback.
            if not handle:
                raise
            exit_with(str(err))
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
                **({"exit_on_error": False} if handle else {}),
                # `python -m lit_prune`, not `__main__.py`, in usage lines (the lit-prune entry point keeps its name)
                **({"prog": "python -m lit_prune"} if sys.argv[0].endswith("__main__.py") else {}),
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
    except INPUT_ERRORS as err:
        if not handle:
            raise
        exit_with(str(err))


def option_value(argv: list[str], option: str) -> str | None:
    """The value of ``--option V`` or ``--option=V`` in ``argv`` (last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


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
