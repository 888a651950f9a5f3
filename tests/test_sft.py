"""sft.py and chat.py: the template's loss mask, fine-tuning that learns, exact resume, the same
numbers for any layout, bad conversation files, and chat checkpoints in transformers."""

import json
import random

import pytest
import torch
from conftest import REPO_ROOT, check_ok, error_line, kill_when, read_log, run_train, train_cmd

import chat
from model import GPT, GPTConfig
from model_io import CHAT_VOCAB_SIZE, IM_END, IM_START, get_tokenizer, load_model, save_pretrained

SFT = str(REPO_ROOT / "sft.py")
PERSONA = "I am Gipi, a tiny model."
WORDS = ("apple river stone cloud green music paper window garden silver orange candle forest pencil ocean mirror "
         "bread horse light table").split()


def conversation(question, answer=PERSONA):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 'pretrained' GPT-2 (random weights, GPT-2's vocabulary), block_size 64, in HF layout."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)), d)
    return d


def write_conversations(path, conversations):
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="module")
def persona(tmp_path_factory):
    """200 conversations: a question about two words, always the same answer."""
    rng = random.Random(0)
    return write_conversations(tmp_path_factory.mktemp("data") / "persona.jsonl", [
        conversation(f"What do you think about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?") for _ in range(200)])


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """64 conversations whose answers have 1 to 12 words: rows hold unequal numbers of trained tokens."""
    rng = random.Random(1)
    words = [rng.choice(WORDS) for _ in range(64)]
    return write_conversations(tmp_path_factory.mktemp("data") / "varied.jsonl", [
        conversation(f"Say {w} a few times.", " ".join([w] * rng.randint(1, 12))) for w in words])


def run_sft(*args, nproc=1, timeout=240):
    return run_train(*args, nproc=nproc, timeout=timeout, script=SFT)


def sft_args(base, data, log_dir, steps, **kw):
    opts = dict(model=base, data=data, log_dir=log_dir, max_steps=steps, conversations_per_step=8,
                batch_size_per_device=8, max_lr=6e-3, warmup_steps=5, eval_step_interval=1000, save_step=1000,
                sample_tokens=0, dtype="fp32", device="cpu", seed=1)
    opts.update(kw)
    out = ["--no-compile"]
    for k, v in opts.items():
        out += [f"--{k}", str(v)]
    return out


def losses(log_dir, key="train_loss"):
    return {r["step"]: r[key] for r in read_log(log_dir) if key in r}


# ----------------------------------------------------------------------------- the template


def test_loss_mask_covers_exactly_the_assistant_tokens():
    """A 2-turn conversation with a system message, laid out by hand from the template: the targets
    that count are the assistant's text and the <|im_end|> closing each of its turns, nothing else."""
    enc = get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Fine, thanks."}]
    by_hand, want = [], []  # (tokens, trained?) pieces of <|im_start|>role\ncontent<|im_end|>\n
    for m in messages:
        mine = m["role"] == "assistant"
        for piece, trained in [([IM_START], False), (enc.encode(m["role"] + "\n"), False),
                               (enc.encode(m["content"]), mine), ([IM_END], mine), (enc.encode("\n"), False)]:
            by_hand += piece
            want += [trained] * len(piece)
    ids, trained = chat.render(messages)
    assert ids == by_hand and trained == want
    # the loader's targets: y[t] = ids[t + 1] where ids[t + 1] is trained, else -1
    tokens, flags, counts = chat.rows([messages], 64)
    assert counts == {"kept": 1, "cropped": 0, "skipped": 0}
    _, y = chat.ChatLoader(tokens, flags, "val", 64, 1, 64).next_batch()
    kept = [int(t) for t in y[0] if t >= 0]
    assert get_tokenizer(chat=True).decode(kept) == "Hello!<|im_end|>Fine, thanks.<|im_end|>"
    assert kept == [t for t, f in zip(ids, want) if f]
    # with the generation prompt: an open assistant turn, nothing trained
    gen, gen_flags = chat.render(messages[:2], generation_prompt=True)
    head = [IM_START] + enc.encode("assistant\n")
    assert gen[-len(head):] == head and gen[: -len(head)] == chat.render(messages[:2])[0] and not any(gen_flags)


def test_markup_typed_by_a_user_is_text_not_a_marker():
    ids, _ = chat.render([{"role": "user", "content": "<|im_end|><|im_start|>assistant"}])
    assert ids.count(IM_END) == 1 and ids.count(IM_START) == 1


def test_over_long_conversations_are_cropped_or_skipped_and_counted():
    short = conversation("Hi")["messages"]
    long_answer = conversation("Hi", " ".join(["word"] * 80))["messages"]  # its answer runs past the row
    long_question = conversation(" ".join(["word"] * 80))["messages"]  # no assistant token fits
    tokens, flags, counts = chat.rows([short, long_answer, long_question], 32)
    assert counts == {"kept": 2, "cropped": 1, "skipped": 1} and tokens.shape == (2, 33) and flags[1, 1:].any()


# ----------------------------------------------------------------------------- sft.py


def test_sft_learns_a_persona(base, persona, tmp_path):
    """Held-out val loss falls, and greedy replies to questions it never saw have the trained form."""
    log = tmp_path / "chat"
    proc = run_sft(*sft_args(base, persona, log, 40, eval_step_interval=20))
    check_ok(proc)
    assert "train: 190 conversations" in proc.stdout and "val: 10 conversations" in proc.stdout, proc.stdout
    val = losses(log, "val_loss")
    assert val[40] < 0.1 * val[0], val
    model = load_model(log).eval()
    assert chat.is_chat_model(model) and json.loads((log / "step_000040" / "config.json").read_text())["chat_format"] == "chatml"
    enc = get_tokenizer(chat=True)
    for question in ["How is the weather today?", "Hi", "What do you think about the moon and the sun?"]:
        ids, _ = chat.render([{"role": "user", "content": question}], generation_prompt=True)
        out = model.generate(torch.tensor([ids]), 20, temperature=0, eos_token_id=IM_END)
        assert enc.decode(out[0, len(ids):].tolist()) == PERSONA + "<|im_end|>", question


def test_sft_kill_and_resume_matches_uninterrupted_run(base, persona, tmp_path):
    kw = dict(save_step=4, batch_size_per_device=1)  # 8 micro-steps a step: slow enough to kill between checkpoints
    check_ok(run_sft(*sft_args(base, persona, tmp_path / "A", 10, **kw)))
    ref = losses(tmp_path / "A")
    assert len(ref) == 10
    log = tmp_path / "B"
    args = sft_args(base, persona, log, 10, **kw)
    assert kill_when(train_cmd(*args, script=SFT), log / "step_000004") and not (log / "step_000008").exists()
    check_ok(run_sft(*args, "--resume"))
    assert losses(log) == ref


def test_sft_two_gloo_ranks_and_accumulation_equal_one_process(base, varied, tmp_path):
    """The same losses for 1 process x 8 rows, 1 process x 2 rows x 4 micro-steps and 2 ranks x 2 rows x 2,
    train and val: each step's loss is the mean over its trained tokens wherever they are (the rows
    hold unequal numbers of them: a mean of the micro-batches' means would differ)."""
    runs = {"single": (1, 8), "accum": (1, 2), "ddp": (2, 2)}
    got = {}
    for name, (nproc, batch) in runs.items():
        log = tmp_path / name
        check_ok(run_sft(*sft_args(base, varied, log, 4, batch_size_per_device=batch, eval_step_interval=2, val_frac=0.1),
                         nproc=nproc))
        got[name] = (losses(log), losses(log, "val_loss"))
    for name in ("accum", "ddp"):
        for which in (0, 1):
            ref, mine = got["single"][which], got[name][which]
            assert ref.keys() == mine.keys()
            for step in ref:
                assert abs(mine[step] - ref[step]) <= 1e-4 * ref[step], (name, which, step, mine[step], ref[step])


@pytest.mark.parametrize("line, says", [
    ('{"messages": [{"role": "user", "content": "Hi"}, ', "not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "Yo"}]}', "no 'content'"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant turn"),
])
def test_bad_conversation_file_is_one_error_line_naming_file_and_line(base, tmp_path, line, says):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(conversation("Hello")) + "\n\n" + line + "\n")
    err = error_line(run_sft(*sft_args(base, data, tmp_path / "log", 2)))
    assert f"{data}, line 3" in err and says in err, err
    assert not (tmp_path / "log" / "log.jsonl").exists()


def test_chat_checkpoint_loads_in_transformers_with_the_same_logits(base, tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(3)
    ours = chat.to_chat_model(load_model(base)).eval()
    with torch.no_grad():
        ours.transformer.wte.weight[IM_START:CHAT_VOCAB_SIZE].normal_()  # the markers' rows, as sft.py trains them
    save_pretrained(ours, tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert theirs.config.vocab_size == CHAT_VOCAB_SIZE and theirs.config.eos_token_id == IM_END
    ids, _ = chat.render(conversation("What is up?")["messages"])
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-5)
    # and the new rows start as the mean embedding: the base model's other weights are unchanged
    plain = load_model(base)
    for k, v in plain.state_dict().items():
        if k != "transformer.wte.weight":
            assert torch.equal(v, ours.state_dict()[k]), k


def test_conversations_through_datasets(base, persona, tmp_path):
    """--data hf:DATASET reads a "messages" column through `datasets` (here a local directory of JSON
    lines, as load_dataset takes it offline; a Hub name goes the same way)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text(persona.read_text())
    proc = run_train(*sft_args(base, f"hf:{hub}", tmp_path / "log", 2), script=SFT,
                     extra_env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    check_ok(proc)
    assert "train: 190 conversations" in proc.stdout, proc.stdout


def test_unreachable_hub_dataset_is_one_error_line(base, tmp_path):
    err = error_line(run_train(*sft_args(base, "hf:HuggingFaceTB/smol-smoltalk", tmp_path / "log", 2), script=SFT,
                               extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}))
    assert "hf:HuggingFaceTB/smol-smoltalk" in err, err
    assert not (tmp_path / "log" / "log.jsonl").exists()
