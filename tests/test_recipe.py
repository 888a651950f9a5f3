"""Tests for train.py's recipes and optimizers: --optimizer muon, --recipe modern, --zero_init_residual.

(The layout-equivalence, kill-and-resume and fp16-unscaling tests of test_train.py run under both
recipes / optimizers too.)
"""
import json

import pytest
import torch

from conftest import T, base_args, check_ok, error_line, read_log, run_train

import cli
import train
from model import GPT, GPTConfig
from model_io import load_model

BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T))


@pytest.mark.parametrize("flags", [["--optimizer", "muon"], ["--recipe", "modern"], ["--recipe", "modern", "--no-decay_embeddings"],
                                   ["--optimizer", "adamw"]])
def test_optimizer_groups_cover_every_parameter_exactly_once(flags):
    """muon: the blocks' 2-D matrices (c_attn, attn c_proj, c_fc, mlp c_proj) in Muon, every other
    parameter in AdamW, each parameter in exactly one group; adamw: everything in AdamW. Weight
    decay on matrices and embeddings (not with --no-decay_embeddings), never on biases or LayerNorm."""
    model = tiny_model()
    args = train.parse_args(flags)
    optimizers = train.build_optimizers(model, args, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names), "a parameter is missing or in two groups"
    adamw = optimizers[0]
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(g["lr"] == args.max_lr and tuple(g["betas"]) == (0.9, 0.95) for g in adamw.param_groups)
    decayed = {names[id(p)] for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {names[id(p)] for g in adamw.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    if args.optimizer == "muon":
        assert len(optimizers) == 2 and isinstance(optimizers[1], torch.optim.Muon)
        in_muon = {names[id(p)] for g in optimizers[1].param_groups for p in g["params"]}
        expected = {n for n in names.values() if n.startswith("transformer.h.") and n.endswith(BLOCK_MATRICES)}
        assert in_muon == expected and len(expected) == 4 * 2
        assert all(p.dim() == 2 for g in optimizers[1].param_groups for p in g["params"])
        assert optimizers[1].param_groups[0]["lr"] == args.muon_lr
    else:
        assert len(optimizers) == 1
    embeddings = {"transformer.wte.weight", "transformer.wpe.weight"}
    if args.decay_embeddings:
        assert embeddings <= decayed
    else:
        assert embeddings <= not_decayed
    for n in not_decayed - embeddings:
        assert n.endswith(".bias") or ".ln_" in n, n
    assert all(names[id(p)] not in decayed or p.dim() >= 2 for p in model.parameters())


def test_recipe_presets_and_explicit_flags():
    """gpt2 is the seed's recipe and the default; modern is Muon + wsd; an explicit flag beats the preset."""
    g = train.parse_args([])
    assert (g.recipe, g.optimizer, g.schedule, g.max_lr, g.min_lr, g.warmup_steps) == ("gpt2", "adamw", "cosine", 6e-4, 6e-5, 715)
    assert g.muon_lr is None and g.decay_embeddings and not g.zero_init_residual
    m = train.parse_args(["--recipe", "modern"])
    for k, v in train.RECIPES["modern"].items():
        assert getattr(m, k) == cli.steps_of(v, m.max_steps), k
    assert m.optimizer == "muon" and m.schedule == "wsd"
    o = train.parse_args(["--recipe", "modern", "--max_lr", "1e-3", "--muon_lr", "5e-3", "--schedule", "cosine"])
    assert (o.max_lr, o.muon_lr, o.schedule, o.optimizer) == (1e-3, 5e-3, "cosine", "muon")
    mixed = train.parse_args(["--optimizer", "muon"])  # the gpt2 recipe with Muon: Muon's settings from modern
    assert mixed.schedule == "cosine" and mixed.muon_lr == train.RECIPES["modern"]["muon_lr"]


@pytest.mark.parametrize("max_steps", [100, 1000, 20000])
def test_modern_recipe_fits_any_run_length(max_steps):
    """--recipe modern with no schedule flag: the warm-up is under a tenth of the run, then max_lr
    holds until the last decay_frac of the steps, which decay (to min_lr at the last step)."""
    a = train.parse_args(["--recipe", "modern", "--max_steps", str(max_steps)])
    lrs = [train.get_lr(s, a) for s in range(max_steps)]
    warmup = next(s for s, lr in enumerate(lrs) if lr == a.max_lr) + 1  # steps up to the first at the peak
    assert 1 <= warmup < max_steps / 10, (warmup, max_steps)
    assert all(lrs[s] < lrs[s + 1] for s in range(warmup - 1))
    decay_start = max_steps - round(a.decay_frac * max_steps)
    assert all(lr == a.max_lr for lr in lrs[warmup:decay_start])
    assert all(lrs[s] > lrs[s + 1] for s in range(decay_start, max_steps - 1)) and lrs[-1] == a.min_lr


def test_warmup_as_a_share_of_the_run(data_dir, tmp_path):
    """--warmup_steps 10% is a tenth of --max_steps, recorded as the steps it resolved to; a warm-up
    that swallows the run is warned about."""
    assert train.parse_args(["--max_steps", "300", "--warmup_steps", "10%"]).warmup_steps == 30
    assert train.parse_args(["--max_steps", "300", "--warmup_steps", "0%"]).warmup_steps == 0
    assert train.parse_args(["--max_steps", "300", "--warmup_steps", "0.1%"]).warmup_steps == 1
    log = tmp_path / "log"
    proc = run_train(*base_args(data_dir, log, 4, warmup_steps=3, sample_tokens=0))
    check_ok(proc)
    assert "warning: the warm-up is 3 of this run's 4 steps" in proc.stdout, proc.stdout
    assert json.loads((log / "run.json").read_text())["settings"]["warmup_steps"] == 3


def test_recipe_is_printed_logged_and_checkpointed(data_dir, tmp_path):
    """The preset's values, with the flags that overrode them, are printed at start and recorded in
    log.jsonl and trainer_state.pt; a modern run trains (loss falls)."""
    log = tmp_path / "log"
    proc = run_train(*base_args(data_dir, log, 8, recipe="modern", muon_lr=4e-3, save_step=4))
    check_ok(proc)
    expected = {"name": "modern", **train.RECIPES["modern"], "max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                "muon_lr": 4e-3}
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("recipe modern:"))
    for k, v in expected.items():
        if k != "name":
            assert f"{k} {v}" in line, (k, line)
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("step") and "| loss" in ln]
    assert len(steps) == 8 and all(" | eta " in ln for ln in steps) and steps[-1].endswith("| eta 0s"), steps
    recs = read_log(log)
    assert recs[0]["recipe"] == expected and recs[0]["step"] == 0
    state = torch.load(log / "step_000008" / "trainer_state.pt", weights_only=True)
    assert state["recipe"] == expected
    assert "muon" in state and state["muon"]["state"], "Muon's momentum is not in the checkpoint"
    train_recs = [r for r in recs if "train_loss" in r]
    for r in train_recs:  # Muon's learning rate follows the same schedule as AdamW's
        assert r["muon_lr"] == pytest.approx(4e-3 * r["lr"] / 3e-3, rel=1e-9), r
    assert train_recs[-1]["train_loss"] < train_recs[0]["train_loss"] - 0.3
    settings = json.loads((log / "run.json").read_text())["settings"]
    assert settings["optimizer"] == "muon" and settings["muon_lr"] == 4e-3


def test_gpt2_run_json_keeps_the_older_settings():
    """A gpt2-recipe run records exactly the settings runs recorded before the recipes existed, so
    those runs still --resume (a new key would read as a changed setting)."""
    older = {"seed", "total_batch_size", "max_steps", "warmup_steps", "max_lr", "min_lr", "schedule", "decay_frac",
             "weight_decay", "grad_clip", "dtype", "val_tokens"}
    args = train.parse_args(["--dtype", "fp32"])
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T)
    keys = set(train.run_settings(args, config)) - set(config.__dict__)
    assert keys == older
    muon = train.run_settings(train.parse_args(["--recipe", "modern", "--dtype", "fp32"]), config)
    assert {"optimizer", "muon_lr", "muon_momentum", "muon_weight_decay"} <= set(muon)


def test_modern_checkpoint_loads_in_transformers_with_the_same_logits(data_dir, tmp_path):
    """A --recipe modern --zero_init_residual run's checkpoint has GPT-2's parameter names and shapes,
    and transformers' GPT2LMHeadModel loads it cleanly with our logits."""
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    common = dict(save_step=6)
    check_ok(run_train(*base_args(data_dir, tmp_path / "modern", 6, recipe="modern", **common), "--zero_init_residual"))
    check_ok(run_train(*base_args(data_dir, tmp_path / "gpt2", 6, **common)))
    shapes = {}
    for name in ("modern", "gpt2"):
        with safe_open(str(tmp_path / name / "step_000006" / "model.safetensors"), "pt") as f:
            shapes[name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["modern"] == shapes["gpt2"]
    ckpt = tmp_path / "modern" / "step_000006"
    hf, info = GPT2LMHeadModel.from_pretrained(str(ckpt), output_loading_info=True)
    assert not any(info.values()), info
    ours = load_model(ckpt)
    assert all(b.attn.c_proj.weight.abs().sum() > 0 for b in ours.transformer.h)  # trained away from zero
    hf.eval(), ours.eval()
    idx = torch.randint(0, 50257, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_zero_init_residual_starts_the_projections_at_zero(data_dir, tmp_path):
    """--zero_init_residual zeroes exactly the residual projections' weights (attn.c_proj, mlp.c_proj);
    every other parameter is GPT-2's initialisation for the seed."""
    inits = {}
    for name, flags in [("zero", ["--zero_init_residual"]), ("plain", [])]:
        cfg = train.parse_args([str(a) for a in base_args(data_dir, tmp_path / name, 4)] + flags)
        model = train.new_model(cfg, train.model_config(cfg))  # what a new run trains from
        inits[name] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in inits["zero"].items():
        if k.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert v.abs().sum() == 0, k
            assert inits["plain"][k].abs().sum() > 0, k
        else:
            assert torch.equal(v, inits["plain"][k]), k


def test_muon_flags_without_muon_are_one_error_line(data_dir, tmp_path):
    proc = run_train(*base_args(data_dir, tmp_path / "log", 2), "--muon_lr", "1e-2")
    assert "--muon_lr" in error_line(proc) and "muon" in error_line(proc)
    assert not (tmp_path / "log").exists()


def test_muon_on_a_pytorch_without_it_is_one_error_line(data_dir, tmp_path, monkeypatch, capsys):
    """PyTorch before 2.9 has no torch.optim.Muon: one line naming the version needed, nothing written."""
    monkeypatch.delattr(torch.optim, "Muon")
    rc = train.main([str(a) for a in base_args(data_dir, tmp_path / "log", 2, recipe="modern")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "2.9" in err[0] and err[0].startswith("error:"), err
    assert not (tmp_path / "log").exists()
    assert train.main([str(a) for a in base_args(data_dir, tmp_path / "log", 2)]) == 0  # adamw needs no Muon


def test_bench_crossing_interpolates_between_evaluations():
    """bench.py's key figure: the tokens at which a val curve first reaches a target, linear between
    evaluations (worked by hand), None when it never does."""
    import bench

    curve = {0: 10.0, 10: 6.0, 20: 5.0, 30: 4.0}
    assert bench._crossing(curve, 5.5, 100) == pytest.approx(1500)  # halfway from step 10 to 20
    assert bench._crossing(curve, 6.0, 100) == pytest.approx(1000)  # reached exactly at an evaluation
    assert bench._crossing(curve, 9.0, 4) == pytest.approx(10)  # 1/4 of the way from 0 to 10, x4 tokens
    assert bench._crossing({0: 10.0, 10: 6.0, 20: 7.0, 30: 5.0}, 6.5, 1) == pytest.approx(8.75)  # the first time
    assert bench._crossing(curve, 3.9, 100) is None
