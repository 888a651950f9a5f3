"""
A standard multi-task suite on EleutherAI's lm-evaluation-harness (lm-eval), scored by this repo's
own exact, packed scoring (scoring.py) and KV-cache generation: lm-eval holds the tasks (their
data, prompts and metrics), this file makes our checkpoints an lm-eval model, "gpt2-repro".

    pip install -r requirements-eval.txt          # lm-eval; training needs none of it
    python evals.py --model log/small             # gpt2-suite on the run's newest checkpoint
    python evals.py --model log/small --all_checkpoints        # every checkpoint -> log/small/evals.jsonl
    torchrun --standalone --nproc_per_node=8 evals.py --model log/small   # requests split across GPUs
    python evals.py --model log/small-chat --tasks arc_easy --apply_chat_template   # a chat model
    python evals.py lm_eval --model gpt2-repro --model_args pretrained=log/small --tasks piqa  # lm-eval's own CLI

gpt2-suite (eval_tasks/gpt2-suite.yaml): tasks a 124M-1.5B model scores above chance on, each with
the metric the suite reads and its chance level. The summary is CORE's centred accuracy (nanochat):
(metric - chance) / (1 - chance) for each task, averaged: 0 is chance, 1 is every answer right.

Our model answers lm-eval's three request types:
  - loglikelihood: scoring.py: the choices of a question in one row (their context once), the
    lm_head only where a continuation token is predicted, no padding to a batch's longest request;
  - loglikelihood_rolling: lm-eval's own rolling windows of block_size tokens, scored the same way;
  - generate_until: decode.generate_stream (KV cache), rows of equal prompt length together,
    stopping at the task's strings or the model's end token.
Numbers are those of lm-eval's hf backend on the same checkpoint (tests/test_evals.py: per request
within 1e-4, the same greedy text, the same metrics). Under torchrun every rank reads the tasks and
scores every world_size-th of the forward passes a single process would run, then all are gathered:
the same results for any world size.

--all_checkpoints appends to RUN/evals.jsonl (one record per step and task, the file rewritten whole
each time) and skips what it holds, so a run killed part-way picks up where it stopped.

Offline, lm-eval cannot download a task's data from the Hugging Face Hub: point it at local files
with --include_path DIR holding a task YAML with `dataset_path: json` (see README).
"""

import functools
import json
import os
import sys

import torch
from tqdm import tqdm

import chat
import cli
import decode
import runtime
import scoring
from model_io import CHAT_TEMPLATE, IM_END, get_tokenizer, load_model
from runtime import DTYPES, best_device

try:  # running the suite needs lm-eval; reading its results (benchmark.ipynb) does not
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    TemplateLM, NO_LM_EVAL = object, str(e)

SUITE_NAME = "gpt2-suite"
# task: (the metric the suite reads, its chance level)
SUITE = {
    "hellaswag": ("acc_norm", 0.25),
    "arc_easy": ("acc", 0.25),
    "arc_challenge": ("acc_norm", 0.25),
    "piqa": ("acc", 0.5),
    "winogrande": ("acc", 0.5),
    "openbookqa": ("acc_norm", 0.25),
    "lambada_openai": ("acc", 0.0),
    "sciq": ("acc", 0.25),
}
# OpenAI's GPT-2 on these tasks and metrics, zero-shot, as lm-eval scores them, where a figure was
# found (README lists the sources): {model: {task: value}}
GPT2_REFERENCE = {
    "GPT-2 124M": {"hellaswag": 0.3114, "piqa": 0.6289, "winogrande": 0.5161, "lambada_openai": 0.3256, "sciq": 0.75},
    "GPT-2 1.5B": {"hellaswag": 0.5089, "piqa": 0.7078, "winogrande": 0.5940, "lambada_openai": 0.5121},
}
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
RESULTS_FILE = "evals.jsonl"


def _require_lm_eval():
    if TemplateLM is object:
        raise cli.Error(f"evals.py needs lm-eval ({NO_LM_EVAL}): pip install -r requirements-eval.txt")


def centred(value, chance):
    return (value - chance) / (1 - chance)


def suite_score(metrics):
    """{task: {metric: value}} -> the mean centred accuracy over the suite's tasks present (None if none)."""
    got = [centred(metrics[t][m], c) for t, (m, c) in SUITE.items() if t in metrics and m in metrics[t]]
    return sum(got) / len(got) if got else None


# -----------------------------------------------------------------------------
# Our model as an lm-eval model


class ReproLM(TemplateLM):
    """lm-eval's model_args: pretrained (a run directory, a checkpoint or an HF-format directory),
    batch_size (requests per forward pass, 16), device, dtype (fp32, bf16, fp16: autocast; default
    bf16 on CUDA, else fp32), max_length (block_size), max_gen_toks (256)."""

    def __init__(self, pretrained, batch_size=16, max_batch_size=None, device=None, dtype=None, max_length=None,
                 max_gen_toks=256, **kwargs):
        super().__init__()
        if kwargs:
            raise cli.Error(f"gpt2-repro: unknown model_args {', '.join(sorted(kwargs))}")
        if dtype is not None and dtype not in DTYPES:
            raise cli.Error(f"gpt2-repro: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            rt = runtime.setup(device, dtype)
        except cli.Error as e:
            raise cli.Error(f"gpt2-repro: {e}") from None
        self.ddp_rank, self.ddp_world = rt.rank, rt.world_size
        self._device = torch.device(rt.device)
        self.model = load_model(pretrained).to(self._device).eval()
        self.name = str(pretrained)
        self.is_chat = chat.is_chat_model(self.model)
        self.enc = get_tokenizer(chat=self.is_chat)
        self.autocast = rt.autocast()
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or self.model.config.block_size)
        if not 1 < self._max_length <= self.model.config.block_size:
            raise cli.Error(f"gpt2-repro: max_length {self._max_length} is not in 2..{self.model.config.block_size}, "
                            f"the model's context")
        self.max_gen_toks = int(max_gen_toks)
        self.special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm-eval's --device/--batch_size where model_args leave them unset (not a clash of the two)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda:0 unless told otherwise; its hf backend then runs where it can
            print(f"warning: --device {extra.pop('device')}, but no CUDA GPU here: {best_device()} instead",
                  file=sys.stderr)
        return cls(**arg_dict, **extra)

    # -- what lm-eval asks of a model ---------------------------------------
    @property
    def eot_token_id(self):
        return IM_END if self.is_chat else self.enc.eot_token

    @property
    def prefix_token_id(self):  # the bos token, as the hf backend (ours is <|endoftext|>)
        return self.enc.eot_token

    @property
    def max_length(self):
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self):
        return "gpt2-chatml" if self.is_chat else "gpt2"

    def chat_template(self, chat_template=False):
        return CHAT_TEMPLATE if self.is_chat else None

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        # special tokens written in the text are special tokens, as transformers' tokenizer reads them
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens):
        return self.enc.decode([t for t in tokens if t not in self.special])

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """chat.render's tokens as text: the open assistant turn with add_generation_prompt, else
        the last message left open (lm-eval's continue_final_message)."""
        if not self.is_chat:
            raise cli.Error(f"--apply_chat_template needs a chat model (sft.py's); {self.name} is not one")
        messages = chat.parse_messages(chat_history, "lm-eval's chat history")
        ids = chat.render(messages, generation_prompt=add_generation_prompt, continue_last=not add_generation_prompt)[0]
        return self.enc.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        bar = tqdm(total=len(pairs), desc="gpt2-repro: loglikelihood requests",
                   disable=disable_tqdm or self.ddp_rank != 0)
        with self.autocast:
            out = scoring.score(self.model, pairs, self.batch_size, self.ddp_rank, self.ddp_world, bar, self.max_length)
        bar.close()
        for (key, _, _), r in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        eos = self.enc.decode([self.eot_token_id])
        jobs = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise cli.Error(f"max_gen_toks {max_gen} leaves no room for a prompt in {self.max_length} tokens")
            tokens = self.tok_encode(context)[-(self.max_length - max_gen):]  # as the hf backend: left-cropped
            sampling = (float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                        kwargs.get("top_k"), kwargs.get("top_p"))
            jobs.append((i, tokens, max_gen, tuple(until), sampling))
        # rows of the same prompt length and settings in one generation; the groups' order fixed,
        # so that a rank takes every world_size-th of the same groups a single process would run
        groups = {}
        for job in jobs:
            groups.setdefault((len(job[1]), job[2], job[3], job[4]), []).append(job)
        plan = [g[k : k + self.batch_size] for _, g in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[1][0][0]))
                for k in range(0, len(g), self.batch_size)]
        bar = tqdm(total=len(jobs), desc="gpt2-repro: generate_until requests",
                   disable=disable_tqdm or self.ddp_rank != 0)
        mine = {}
        for b in range(self.ddp_rank, len(plan), self.ddp_world):
            mine.update(self._generate(plan[b]))
            bar.update(len(plan[b]))
        bar.close()
        if self.ddp_world > 1:
            parts = [None] * self.ddp_world
            torch.distributed.all_gather_object(parts, mine)
            mine = {k: v for part in parts for k, v in part.items()}
        out = [mine[i] for i in range(len(jobs))]
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate(self, batch):
        """Rows of one prompt length and settings -> {request index: text before its first stop string}."""
        _, _, max_gen, until, (temperature, top_k, top_p) = batch[0]
        idx = torch.tensor([job[1] for job in batch], device=self._device)
        made = [[] for _ in batch]
        done = [False] * len(batch)
        with self.autocast:
            for step in decode.generate_stream(self.model, idx, max_gen, temperature=temperature, top_k=top_k,
                                               top_p=top_p, eos_token_id=self.eot_token_id, seed=1234):
                for r, t in enumerate(step.tolist()):
                    if done[r]:
                        continue
                    if t == self.eot_token_id:
                        done[r] = True
                        continue
                    made[r].append(t)
                    done[r] = any(s and s in self.tok_decode(made[r]) for s in until)
                if all(done):
                    break
        return {job[0]: postprocess_generated_text(self.tok_decode(m), list(until), None)
                for job, m in zip(batch, made)}


@functools.cache
def make_lm_class():
    """ReproLM, registered with lm-eval as gpt2-repro (once)."""
    _require_lm_eval()
    from lm_eval.api.registry import register_model

    register_model("gpt2-repro")(ReproLM)
    return ReproLM


# -----------------------------------------------------------------------------
# Tasks and results


def task_manager(names, include_paths=()):
    """lm-eval's TaskManager: over --include_path and the suite's YAML alone when they hold every task
    named (indexing lm-eval's thousands of task files takes seconds), else over lm-eval's own too."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[TASKS_DIR, *include_paths], include_defaults=False)
    if all(n in local.all_tasks and n != SUITE_NAME for n in names):
        return local
    return TaskManager(include_path=[TASKS_DIR, *include_paths])


def expand(names, manager):
    """--tasks' names -> the task names lm-eval will run (a group such as gpt2-suite: its tasks), each
    checked to exist; one line naming an unknown one."""
    out = []
    for name in names:
        if name == SUITE_NAME:
            out += [t for t in SUITE if t not in out]
        elif name in manager.all_tasks:
            out += [name] if name not in out else []
        else:
            raise cli.Error(f"unknown task {name!r}: not one of lm-eval's tasks nor in --include_path "
                            f"(`lm_eval ls tasks` lists them)")
    return out


def load_tasks(names, manager):
    """lm-eval's task objects, each loaded by itself so that a failing one is named: offline, a task whose
    data lives on the Hugging Face Hub is one line saying how to point lm-eval at local files."""
    loaded = {}
    for name in names:
        try:
            loaded.update(manager.load([name])["tasks"])
        except Exception as e:  # datasets/huggingface_hub raise many kinds when the Hub is unreachable
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise cli.Error(f"task {name}: its data did not load ({type(e).__name__}: {first}). Offline, lm-eval "
                            f"cannot download it from the Hugging Face Hub: point it at local files with "
                            f"--include_path DIR holding a YAML task with dataset_path: json (see README)") from None
    return loaded


def metrics_of(results, names):
    """lm-eval's results -> {task: {metric: value}} (its "acc,none" keys without the filter, no stderr)."""
    out = {}
    for name in names:
        r = results["results"].get(name, {})
        out[name] = {k.split(",")[0]: v for k, v in r.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def evaluate(lm, names, manager, args):
    """Run lm-eval on the tasks -> (its results (None on ranks other than 0), {task: {metric: value}})."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(load_tasks(names, manager).values()), task_manager=manager, num_fewshot=args.num_fewshot,
        limit=args.limit, apply_chat_template=args.apply_chat_template, bootstrap_iters=0,
        log_samples=bool(args.samples), random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    return results, (metrics_of(results, names) if results is not None else None)


def table(metrics):
    rows = [f"{'task':<16} {'metric':<9} {'value':>8}  {'chance':>6}  {'centred':>7}"]
    for task, ms in metrics.items():
        m, chance = SUITE.get(task, (None, None))
        for k, v in sorted(ms.items()):
            c = f"{chance:6.2f}  {centred(v, chance):7.4f}" if k == m else ""
            rows.append(f"{task:<16} {k:<9} {v:8.4f}  {c}")
    s = suite_score(metrics)
    if s is not None:
        n = sum(t in metrics for t in SUITE)
        rows.append(f"{SUITE_NAME} (mean centred accuracy of {n} of its {len(SUITE)} tasks): {s:.4f}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# A run's checkpoints


def read_results(path):
    """RUN/evals.jsonl -> [record]; one line naming a damaged file."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                if not (isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("task"), str)):
                    raise ValueError("not a record with a step and a task")
            except ValueError as e:
                raise cli.Error(f"{path} line {n} is damaged ({e}); move it away to score again") from None
            records.append(r)
    return records


def settings_of(args):
    return {"num_fewshot": args.num_fewshot, "limit": args.limit, "apply_chat_template": args.apply_chat_template}


def all_checkpoints(args, names, manager, rank):
    from lm_eval.api.registry import get_model

    from model_io import checkpoint_dirs

    steps = checkpoint_dirs(args.model)
    if not steps:
        raise cli.Error(f"--all_checkpoints: {args.model} is not a train.py run directory with checkpoints")
    path = os.path.join(args.model, RESULTS_FILE)
    records = read_results(path)
    here = settings_of(args)
    for r in records:
        if r.get("settings") != here and r["task"] in names:
            raise cli.Error(f"{path} holds {r['task']} scored with {r.get('settings')}, not {here}: score with "
                            f"those settings, or move the file away")
    done = {(r["step"], r["task"]) for r in records}
    todo = [(d, int(os.path.basename(d).split("_")[1])) for d in steps]
    todo = [(d, s, [t for t in names if (s, t) not in done]) for d, s in todo]
    todo = [x for x in todo if x[2]]
    if rank == 0:
        print(f"{args.model}: {len(steps)} checkpoints, {len(steps) - len(todo)} already scored, {len(todo)} to score "
              f"(results: {path})")
    Model = get_model("gpt2-repro")
    for d, step, tasks in todo:
        lm = Model(d, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        _, metrics = evaluate(lm, tasks, manager, args)
        if rank == 0:
            records += [{"step": step, "task": t, "metrics": metrics[t], "settings": here} for t in tasks]
            records.sort(key=lambda r: (r["step"], r["task"]))
            cli.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
            s = suite_score(metrics)
            shown = {t: SUITE[t][0] if t in SUITE else min(metrics[t], default=None) for t in tasks}
            print(f"step {step}: " + "  ".join(f"{t} {m} {metrics[t][m]:.4f}" for t, m in shown.items() if m)
                  + (f"  ({SUITE_NAME} {s:.4f})" if s is not None else ""))
        del lm
    return 0


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm_eval"]:  # lm-eval's own CLI, with our model and suite known to it
        try:
            _require_lm_eval()
        except cli.Error as e:
            return cli.fail(e)
        make_lm_class()
        from lm_eval.__main__ import cli_evaluate

        rest = argv[1:]
        sys.argv = ["lm_eval", *rest, *(["--include_path", TASKS_DIR] if "--include_path" not in rest else [])]
        try:
            cli_evaluate()
        except cli.Error as e:
            return cli.fail(e)
        return 0
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", required=True,
                   help="a train.py run directory (its newest checkpoint), a checkpoint or an HF-format directory")
    p.add_argument("--tasks", default=SUITE_NAME,
                   help=f"comma-separated lm-eval task names; {SUITE_NAME}: the suite (default: %(default)s)")
    p.add_argument("--num_fewshot", type=cli.non_negative_int, default=None,
                   help="examples before each question (default: each task's own)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N examples of each task")
    p.add_argument("--batch_size", type=cli.positive_int, default=16, help="requests per forward pass (default: 16)")
    p.add_argument("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on CUDA, else fp32)")
    p.add_argument("--include_path", action="append", default=[],
                   help="a directory of lm-eval task YAMLs (local data: dataset_path json); repeatable")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="render each request as a chat (a chat model's template, chat.py's)")
    p.add_argument("--all_checkpoints", action="store_true",
                   help=f"score every checkpoint of the run --model names into RUN/{RESULTS_FILE} (resumable)")
    p.add_argument("--json", default=None, help="write the metrics (and the suite score) here")
    p.add_argument("--samples", default=None, help="write every request and its answer here (lm-eval's samples)")
    p.add_argument("--seed", type=cli.non_negative_int, default=1234, help="lm-eval's seeds (few-shot sampling)")
    args = p.parse_args(argv)
    try:
        _require_lm_eval()
        import logging

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        rank = runtime.setup(distributed=True).rank  # (the model's device is set up by ReproLM)
        asked = [t for t in args.tasks.split(",") if t]
        manager = task_manager(asked, args.include_path)
        names = expand(asked, manager)
        make_lm_class()
        if args.all_checkpoints:
            status = all_checkpoints(args, names, manager, rank)
        else:
            from lm_eval.api.registry import get_model

            lm = get_model("gpt2-repro")(args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
            results, metrics = evaluate(lm, names, manager, args)
            if rank == 0:
                print(f"{args.model}, lm-eval {_version()}, {args.num_fewshot or 0}-shot"
                      + (f", first {args.limit} of each task" if args.limit else ""))
                print(table(metrics))
                if args.json:
                    cli.atomic_write(args.json, json.dumps({"model": args.model, "metrics": metrics,
                                                            SUITE_NAME: suite_score(metrics),
                                                            "settings": settings_of(args)}, indent=1))
                if args.samples:
                    cli.atomic_write(args.samples, json.dumps(results["samples"], default=str))
            status = 0
    except cli.Error as e:
        return cli.fail(e)
    finally:
        runtime.teardown()
    return status


def _version():
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


if __name__ == "__main__":
    sys.exit(main())
