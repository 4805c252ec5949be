"""Bad inputs end in one ``error:`` line, exit code 2, no traceback, and leave nothing on disk (issue 16).

The CLI runs in-process with ``exit_on_error=True`` (what the command line gets); tiny random models only.
"""

import json
import logging
import signal
import warnings
from pathlib import Path

import pytest
import torch

from lit_prune.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI, assert exit code 2 and exactly one error line without a traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv, exit_on_error=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Namespace(" not in err
    return lines[0]


@pytest.fixture()
def search_args(tiny_checkpoint, tiny_text, tmp_path):
    """A CLP search on the tiny model with the config's own TensorBoard logger under tmp_path/runs."""
    return [
        "fit", "-c", str(CONFIGS / "clp_smollm2.yaml"),
        f"--model.init_args.pretrained={tiny_checkpoint}", f"--data.text_files=[{tiny_text}]",
        "--data.max_length=32", "--model.init_args.dtype=float32", "--trainer.max_steps=2",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}",
    ]


def _validate_args(tiny_checkpoint, tiny_text, tmp_path):
    return [
        "validate", "-c", str(CONFIGS / "eval_smollm2.yaml"), f"--model.init_args.pretrained={tiny_checkpoint}",
        f"--data.text_files=[{tiny_text}]", "--data.max_length=32", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]


def test_a_value_our_check_rejects_is_one_line_naming_the_key(search_args, tmp_path, capsys):
    line = _fails([*search_args, "--model.init_args.ratio=1.5"], capsys)
    assert line.startswith("error: `model.init_args.ratio` must be in (0, 1), got 1.5")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("--model.init_args.ratoi=0.5", "Did you mean --model.init_args.ratio?"),
    ("--trainer.max_stpes=3", "Did you mean --trainer.max_steps?"),
    ("--data.batch_sise=3", "Did you mean --data.batch_size?"),
])
def test_a_mistyped_key_gets_the_closest_key(search_args, typo, suggestion, capsys):
    line = _fails([*search_args, typo], capsys)
    assert typo.split("=")[0] in line and line.endswith(suggestion)


def test_a_negative_learning_rate_names_the_config_key_before_weights_load(search_args, tmp_path, capsys, monkeypatch):
    import lit_prune.hf

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the optimizer check")

    monkeypatch.setattr(lit_prune.hf, "load_causal_lm", no_load)
    line = _fails([*search_args, "--model.init_args.optimizer.init_args.lr=-0.1"], capsys)
    assert "`model.init_args.optimizer.init_args.lr`" in line and "torch.optim.Adam" in line and "-0.1" in line
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_another_gate_is_refused_before_restoring(tiny_checkpoint, tiny_text, tmp_path, capsys):
    # What a CLP search checkpoints (the frozen model is stripped): the concave gate's parameter and buffers.
    ckpt = tmp_path / "clp.ckpt"
    torch.save({"state_dict": {"gate.starts": torch.zeros(1), "init_keep": torch.ones(6)}, "global_step": 4}, ckpt)
    e3 = [
        "fit", "-c", str(CONFIGS / "e3_smollm2.yaml"), f"--model.init_args.pretrained={tiny_checkpoint}",
        f"--data.text_files=[{tiny_text}]", "--data.max_length=32", "--model.init_args.dtype=float32",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--ckpt_path={ckpt}",
    ]
    line = _fails(e3, capsys)
    assert str(ckpt) in line and "gate.starts" in line and "gate.logits" in line and "another stage or gate" in line
    assert not (tmp_path / "runs").exists()


def test_a_truncated_or_missing_checkpoint_names_the_file(search_args, tmp_path, capsys):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"gate.starts": torch.zeros(1)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:200])
    line = _fails([*search_args, f"--ckpt_path={cut}"], capsys)
    assert f"`--ckpt_path` {cut} cannot be read" in line and "complete" in line
    line = _fails([*search_args, f"--ckpt_path={tmp_path / 'nowhere.ckpt'}"], capsys)
    assert "nowhere.ckpt does not exist" in line
    assert not (tmp_path / "runs").exists()


def test_validate_without_held_out_blocks_is_an_error(tiny_checkpoint, tiny_text, tmp_path, capsys):
    line = _fails([*_validate_args(tiny_checkpoint, tiny_text, tmp_path), "--data.val_fraction=0"], capsys)
    assert "`data.val_fraction` is 0" in line and "--data.val_fraction=0.1" in line
    assert not (tmp_path / "runs").exists()


def test_a_folder_without_config_json_says_so(tiny_checkpoint, tiny_text, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("x")
    args = _validate_args(tiny_checkpoint, tiny_text, tmp_path)
    line = _fails([*args, f"--model.init_args.pretrained={tmp_path / 'not_a_model'}"], capsys)
    assert "folder without config.json" in line and "notes.txt" in line and "model_type" not in line


def test_an_unreachable_hub_id_fails_at_once_with_the_offline_hint(monkeypatch):
    import socket

    from huggingface_hub import constants

    from lit_prune import hf

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ValueError, match=r"`model.init_args.pretrained`='someone/missing'.*HF_HUB_OFFLINE=1.*offline:"):
        hf.read_config("someone/missing")


def test_an_empty_text_file_says_0_tokens_and_leaves_no_run_folder(search_args, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # The data are read in setup, after the logger made version_0 and wrote config.yaml there.
    line = _fails([*search_args, f"--data.text_files=[{empty}]"], capsys)
    assert "0 tokens" in line and str(empty) in line
    assert not (tmp_path / "runs").exists()


def test_other_commands_share_the_style_and_leave_no_out_folder(tiny_text, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    out = tmp_path / "eval_out"
    line = _fails(["evaluate", "--models", f"dense={tmp_path / 'not_a_model'}", "--text-files", str(tiny_text),
                   "--out", str(out)], capsys)
    assert "folder without config.json" in line
    assert not out.exists()
    line = _fails(["export", "--model", "x", "--mask", str(tmp_path / "no_mask.json"), "--out", str(tmp_path / "e")],
                  capsys)
    assert "no_mask.json" in line and not (tmp_path / "e").exists()


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "predict" not in capsys.readouterr().out
    assert "'predict' is not a command" in _fails(["predict"], capsys)
    assert _fails(["exprot", "--model", "m"], capsys).endswith("Did you mean export?")


def test_debug_mode_gives_the_traceback(search_args, monkeypatch):
    monkeypatch.setenv("LIT_PRUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="ratio"):
        main([*search_args, "--model.init_args.ratio=1.5"], exit_on_error=True)


def test_known_third_party_noise_is_filtered_and_other_warnings_are_not(caplog):
    from lit_prune._warnings import quiet_third_party

    quiet_third_party()
    with caplog.at_level(logging.INFO):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: install our cloud")
        logging.getLogger("torchao").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()
        warnings.warn("Found 85 module(s) in eval mode at the start of training. This may ...", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


def test_only_folders_this_run_created_and_left_empty_are_removed(tmp_path):
    from lit_prune.cli_errors import first_missing, remove_if_left_empty

    (tmp_path / "runs").mkdir()
    run = tmp_path / "runs" / "clp" / "version_0"
    created = first_missing(run)
    assert created == tmp_path / "runs" / "clp"
    (run / "sub").mkdir(parents=True)
    (run / "events.out.tfevents.1.host").write_bytes(b"x")
    (run / "sub" / "events.out.tfevents.2.host").write_bytes(b"x")
    (run / "config.yaml").write_text("a: 1")
    remove_if_left_empty(run, created)
    assert not (tmp_path / "runs" / "clp").exists() and (tmp_path / "runs").is_dir()  # runs/ was there before
    run.mkdir(parents=True)
    (run / "mask.json").write_text("{}")
    remove_if_left_empty(run, created)
    assert (run / "mask.json").is_file()  # a real output is kept
    remove_if_left_empty(run, None)  # the folder existed before this run: never touched
    assert run.is_dir()


def test_ctrl_c_during_fit_saves_a_checkpoint_and_prints_how_to_resume(tmp_path, caplog):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_prune.cli import ResumeHint

    class StopsAtStep3(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    argv = ["fit", "-c", "configs/clp_smollm2.yaml", "--ckpt_path=old.ckpt", "--ckpt_path", "older.ckpt"]
    trainer = pl.Trainer(max_steps=10, callbacks=[ResumeHint(argv)], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    handler = signal.getsignal(signal.SIGINT)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
            trainer.fit(StopsAtStep3())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl+C after the first one
    saved = tmp_path / "checkpoints" / "interrupted-step=3.ckpt"
    assert torch.load(saved, weights_only=False)["global_step"] == 3
    text = caplog.text
    assert "Interrupted at step 3 of 10" in text
    assert f"python -m lit_prune fit -c configs/clp_smollm2.yaml --ckpt_path={saved}" in text
    assert "old.ckpt" not in text and "older.ckpt" not in text


def test_evaluate_reports_progress_per_model(tiny_checkpoint, tiny_text):
    from lit_prune.evaluate_models import evaluate

    lines: list[str] = []
    evaluate({"dense": str(tiny_checkpoint), "again": str(tiny_checkpoint)}, text_files=[str(tiny_text)],
             max_length=32, dtype="float32", device="cpu", plot=False, progress=lines.append)
    assert lines[0] == f"[1/2] dense: loading {tiny_checkpoint}"
    assert any(line.startswith("[1/2] dense: ppl ") for line in lines)
    # Which tokens the perplexity is over, so it is not mistaken for validate's (which may cap the blocks).
    protocol = next(line for line in lines if "perplexity over" in line)
    assert "held-out tail (last 0.1 of the blocks)" in protocol and "32-token blocks" in protocol
    assert lines[-1].startswith("[2/2] again: done in ")


def test_usage_errors_of_the_other_commands_are_one_line_with_the_closest_option(tmp_path, capsys):
    line = _fails(["export", "--model", "m", "--mask", "m.json", "--out", str(tmp_path / "o"), "--dtyp2", "float32"],
                  capsys)
    assert "unrecognized arguments: --dtyp2" in line and "Did you mean --dtype?" in line
    line = _fails(["evaluate", "--models", "dense=m"], capsys)
    assert "required: --out" in line and "python -m lit_prune evaluate --help" in line


@pytest.mark.parametrize(("bad", "expected"), [
    ("--model.init_args.mask_mode=cut",
     "error: `model.init_args.mask_mode`: got cut, expected one of ['drop', 'gate']"),
    ("--data.batch_size=abc", "error: `data.batch_size`: got abc, expected int"),
])
def test_a_value_of_the_wrong_type_names_its_key(tiny_checkpoint, tiny_text, tmp_path, bad, expected, capsys):
    line = _fails([*_validate_args(tiny_checkpoint, tiny_text, tmp_path), bad], capsys)
    assert line.startswith(expected)


def test_validate_with_a_mask_says_what_it_drops_and_where_the_logs_are(tiny_checkpoint, tiny_text, tmp_path, capsys):
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    main([*_validate_args(tiny_checkpoint, tiny_text, tmp_path), f"--model.init_args.mask={mask}",
          "--model.init_args.dtype=float32", "--trainer.limit_val_batches=1"], exit_on_error=True)
    out = capsys.readouterr().out
    assert f"mask {mask}: manual: drop 2/6 layers, segments [2, 4)" in out and "layers [2, 3] removed by surgery" in out
    log_dir = tmp_path / "runs" / "smollm2" / "version_0"
    assert f"logs: {log_dir}" in out and log_dir.is_dir()


@pytest.mark.parametrize(("typo", "expected"), [
    (("    ratio: 0.25 ", "    ratoi: 0.25 "),
     "error: `model.init_args.ratoi`: not an option of lit_prune.MaskSearch"),
    (("  max_steps: 60", "  max_stpes: 60"), "error: `trainer.max_stpes` (in the config): unknown option"),
])
def test_a_mistyped_key_in_a_config_file_gets_the_closest_key(search_args, tmp_path, typo, expected, capsys):
    config = tmp_path / "typo.yaml"
    text = (CONFIGS / "clp_smollm2.yaml").read_text()
    assert typo[0] in text
    config.write_text(text.replace(typo[0], typo[1]))
    line = _fails([*search_args[:2], str(config), *search_args[3:]], capsys)
    suggestion = {"ratoi": "model.init_args.ratio", "max_stpes": "trainer.max_steps"}
    assert line.startswith(expected)
    assert line.endswith(f"Did you mean {next(v for k, v in suggestion.items() if k in typo[1])}?")


@pytest.mark.parametrize(("bad", "expected"), [
    ("--model.init_args.gate=lit_prune.ConcaveGat",
     "error: `model.init_args.gate`: there is no class lit_prune.ConcaveGat. Did you mean lit_prune.ConcaveGate?"),
    ("--model.class_path=lit_prune.MaskSerch",
     "error: `model.class_path`: there is no class lit_prune.MaskSerch. Did you mean lit_prune.MaskSearch?"),
])
def test_a_mistyped_class_path_gets_the_closest_class(search_args, bad, expected, capsys):
    assert _fails([*search_args, bad], capsys) == expected


def test_a_path_that_does_not_exist_is_named_as_a_path(tiny_checkpoint, tiny_text, tmp_path, capsys):
    args = _validate_args(tiny_checkpoint, tiny_text, tmp_path)
    line = _fails([*args, f"--model.init_args.pretrained={tmp_path / 'runs' / 'typo'}"], capsys)
    assert f"there is no folder {tmp_path / 'runs' / 'typo'}" in line and "Repo id" not in line
