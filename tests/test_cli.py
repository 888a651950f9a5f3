"""Bad command-line values: refused at parse time with one `error:` line naming the flag, exit 2."""
import pytest

import fineweb
import generate
import hellaswag
import serve
import train


def run_main(main, argv, capsys):
    """(exit status, stderr lines) of a script's main(argv), whether it returns or exits."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


@pytest.mark.parametrize("flag,value", [
    ("grad_clip", "-1"), ("grad_clip", "0"),  # gradient ascent / never learns
    ("n_layer", "0"), ("n_head", "0"), ("n_embd", "0"), ("block_size", "0"),  # not silently the preset
    ("max_lr", "inf"), ("max_lr", "nan"), ("max_lr", "0"), ("min_lr", "-1e-4"), ("weight_decay", "-0.1"),
    ("max_steps", "0"), ("max_steps", "2.5"), ("warmup_steps", "-1"), ("seed", "-1"), ("val_tokens", "0"),
    ("eval_max_steps", "0"), ("save_step", "0"), ("batch_size_per_device", "x"), ("hellaswag_examples", "-2"),
    ("sample_tokens", "-1"), ("keep_checkpoints", "-1"), ("device", "foo"), ("device", "tpu"),
])
def test_train_refuses_bad_values_at_parse_time(flag, value, capsys):
    rc, err = run_main(train.main, [f"--{flag}", value, "--path", "no_such_dir"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and f"--{flag}" in err[0], (rc, err)


def test_train_refuses_min_lr_above_max_lr(capsys):
    rc, err = run_main(train.main, ["--max_lr", "1e-4", "--min_lr", "1e-3", "--path", "no_such_dir"], capsys)
    assert rc == 2 and len(err) == 1 and "--min_lr" in err[0], (rc, err)


def test_train_accepts_the_numbers_people_write():
    args = train.parse_args(["--total_batch_size", "524_288", "--max_steps", "1e4", "--max_lr", "6e-4"])
    assert (args.total_batch_size, args.max_steps, args.max_lr) == (524288, 10000, 6e-4)


@pytest.mark.parametrize("main,argv,flag", [
    (fineweb.main, ["--shard_size", "0"], "--shard_size"),
    (fineweb.main, ["--workers", "two"], "--workers"),
    (generate.main, ["--device", "foo"], "--device"),
    (generate.main, ["--unknown_flag", "1"], "--unknown_flag"),
    (generate.main, ["--temperature", "-1"], "--temperature"),
    (generate.main, ["--top_p", "0"], "--top_p"),
    (generate.main, ["--top_p", "1.5"], "--top_p"),
    (generate.main, ["--num_samples", "0"], "--num_samples"),
    (generate.main, ["--max_new_tokens", "nan"], "--max_new_tokens"),
    (hellaswag.main, ["--batch_size", "0"], "--batch_size"),
    (hellaswag.main, ["--limit", "-3"], "--limit"),
    (hellaswag.main, ["--device", "foo"], "--device"),
    (serve.main, ["--model", "m", "--port", "70000"], "--port"),
    (serve.main, ["--model", "m", "--max_batch", "0"], "--max_batch"),
    (serve.main, ["--model", "m", "--max_body_bytes", "0.5"], "--max_body_bytes"),
    (serve.main, ["--port", "8000"], "--model"),
])
def test_other_scripts_use_the_same_one_line_errors(main, argv, flag, capsys):
    rc, err = run_main(main, argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and flag in err[0], (rc, err)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("script", ["train", "sft", "fineweb", "generate", "hellaswag", "serve", "bench"])
def test_help_gives_every_flag_a_text_and_its_default(script, monkeypatch):
    """--help: every flag has a help text, and every flag with a default names it ('default: ...'
    or, for the recipe flags, 'default: by --recipe, gpt2 ..., modern ...')."""
    import importlib

    import cli

    def capture(self, argv=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(cli.Parser, "parse_args", capture)
    module = importlib.import_module(script)
    with pytest.raises(_Captured) as got:
        module.main([]) if script != "bench" else module.main()
    parser = got.value.args[0]
    parser.format_help()  # (formats without error)
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{script} {action.option_strings[0]} has no help"
        entry = "".join(parser._get_formatter()._format_action(action).split())  # (no spaces: wrapping aside)
        if action.default is None or action.default is False:
            continue
        checked += 1
        assert "(default" in entry, f"{script} {action.option_strings[0]}: default {action.default!r} not shown: {entry}"
        if "(default:" not in action.help:  # the formatter's: the value itself
            assert f"(default:{action.default})".replace(" ", "") in entry, (script, action.option_strings[0], entry)
    assert checked >= 3, (script, checked)
    if script == "train":
        for flag, value in (("--max_lr", "gpt20.0006,modern"), ("--optimizer", "gpt2adamw,modernmuon")):
            action = next(a for a in parser._actions if flag in a.option_strings)
            assert f"(default:by--recipe,{value}" in "".join(parser._get_formatter()._format_action(action).split())
