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
