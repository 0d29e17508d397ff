"""No input may exhaust memory: every size that a config, a checkpoint or a command-line option sets
is bounded, and a value far above its default ends in a one-line error, quickly and in little memory.

The property: for every config key and option that sizes memory, a value 10^6 times its default
(the checkpoint's value where the option defaults to it; 10^6 where the default is 0, "automatic")
ends in an error of one line (argparse's usage block plus its error line count as one) within 5 s
and under 1 GiB of peak RSS, and the error names the key or option and how to raise the limit.
The table of cases is derived from `SIZE_LIMITS` and the commands' parsers, so that a limit or a
bounded option added later is tested too; `test_every_numeric_setting_is_bounded_or_said_not_to_size_memory`
makes a new numeric setting choose between the two.

Each case runs in its own process, measured with `wait4` (its own peak RSS and time) and killed if
it passes 20 s or 2 GiB, so that a missing limit fails the test instead of the machine. Paying the
interpreter's and torch's start-up (seconds of CPU) for each of some fifty cases would make this
file slow, so most cases run in a process forked from one that has imported the commands already,
calling the command's `main` as its console script does, and timed from the fork. A few cases, the
commands exactly as a user types them, run as `python -m transformer.CMD`, timed by their CPU
seconds, which a busy machine does not inflate as it does wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.commands import attention, average, evaluate, export, generate, translate
from transformer.config import (
    SIZE_LIMITS,
    SIZE_LIMITS_ENV,
    Config,
    ConfigError,
    bounded_int,
    config_to_dict,
    load_config,
    size_limit,
)

ROOT = Path(__file__).resolve().parents[1]
SCALE = 10**6
SECONDS, GIB = 5.0, 1 << 30
DEFAULTS = config_to_dict(Config())
CONFIG_KEYS = [key for key in SIZE_LIMITS if key.split(".")[0] in DEFAULTS]
# Numeric config keys that size no memory, with the reason.
NOT_SIZES = {
    "model.dropout": "a probability", "model.attention_dropout": "a probability",
    "data.clean_max_words": "a filter", "data.clean_ratio": "a filter",
    "tokenizer.character_coverage": "a fraction",
    "tokenizer.sample_size": "the sample is at most the corpus, which is held anyway",
    "train.seed": "a seed", "train.max_steps": "a budget", "train.max_epochs": "a budget",
    "train.max_minutes": "a budget", "train.lr_scale": "a rate", "train.warmup_steps": "a schedule",
    "train.cooldown": "a fraction", "train.adam_beta1": "a rate", "train.adam_beta2": "a rate",
    "train.adam_eps": "a constant", "train.weight_decay": "a rate", "train.label_smoothing": "a probability",
    "train.clip_norm": "a norm", "train.log_every": "a cadence", "train.eval_every": "a cadence",
    "train.eval_bleu_sentences": "at most the validation split, which is held anyway",
    "train.save_every": "a cadence", "train.keep_last": "files on disk, not memory",
    "train.patience": "a count of validations", "train.max_nonfinite": "a count of steps",
    "train.short_budget_below": "a count of steps", "train.short_budget_max_steps": "a budget",
    "train.short_budget_lr_scale": "a rate", "train.short_budget_dropout": "a probability",
    "train.average_last": "checkpoints are averaged one at a time",
    "decode.length_penalty": "a weight", "decode.rerank_weight": "a weight",
    "decode.n_best": "at most decode.beam_size, which is bounded",
}
# Commands with numeric options, the arguments each needs besides the one under test, and the
# numeric options that size no memory.
COMMANDS = {
    "transformer.commands.evaluate": (evaluate, ["--checkpoint", "{ckpt}", "--device", "cpu"]),
    "transformer.commands.translate": (translate, ["--checkpoint", "{ckpt}", "--device", "cpu"]),
    "transformer.commands.attention": (attention, ["--checkpoint", "{ckpt}", "--device", "cpu", "--sentence",
                                                    "ein hund", "--output", "{tmp}/attention.png"]),
    "transformer.commands.generate": (generate, ["{lm}"]),
    "transformer.commands.average": (average, []),
    "transformer.commands.export": (export, []),
}
OPTIONS_NOT_SIZES = {
    "--alpha": "a weight", "--rerank-weight": "a weight", "--temperature": "a temperature",
    "--top-k": "at most the vocabulary", "--top-p": "a probability", "--seed": "a seed",
    "--last": "checkpoints are averaged one at a time", "--length-penalty": "a weight",
}


def numeric_options(module) -> list[argparse.Action]:
    parser = module._parser()
    return [a for a in parser._actions if a.option_strings and (a.type in (int, float) or hasattr(a.type, "size_key"))]


def scaled(value: float) -> int | float:
    """10^6 times a default; 10^6 for a default of 0 (automatic)."""
    return (value or 1) * SCALE


def cases() -> list[dict]:
    """Every case: an id, how it runs ("fork" or "exec"), the module, its arguments (with {placeholders}
    filled by the `results` fixture) and what its error must name."""
    found = []
    for key in CONFIG_KEYS:  # in a training config (an override), 10^6 times the default
        section, name = key.split(".")
        value = scaled(DEFAULTS[section][name])
        found.append(dict(id=f"train {key}", kind="fork", module="transformer.train", names=key, limit=key,
                          argv=["--config", "{config}", f"{key}={value}", "train.output_dir={tmp}/run"]))
    for key in CONFIG_KEYS:  # in a checkpoint's config, 10^6 times the checkpoint's value
        found.append(dict(id=f"checkpoint {key}", kind="fork", module="transformer.commands.evaluate", names=key, limit=key,
                          argv=["--checkpoint", f"{{variants}}/{key}.pt", "--device", "cpu"]))
    for module_name, (module, base) in COMMANDS.items():
        for action in numeric_options(module):
            option = action.option_strings[-1]
            if not hasattr(action.type, "size_key"):
                continue
            key = action.type.size_key
            value = "{%s}" % key.replace(".", "_") if action.default is None else scaled(action.default)
            found.append(dict(id=f"{module_name.split('.')[1]} {option}", kind="fork", module=module_name,
                              names=option, limit=key, argv=[*base, option, str(value)]))
    for name in generate.LM_SIZES:  # in a language model's settings, 10^6 times the file's value
        found.append(dict(id=f"generate settings {name}", kind="fork", module="transformer.commands.generate",
                          names=f"settings {name}", limit=generate.LM_SIZES[name], argv=[f"{{lm_variants}}/{name}.pt"]))
    # Whole commands, as a user runs them.
    found += [
        dict(id="python -m evaluate --beam 1000000", kind="exec", module="transformer.commands.evaluate", names="--beam",
             limit="decode.beam_size", argv=["--checkpoint", "{ckpt}", "--device", "cpu", "--beam", "1000000"]),
        dict(id="python -m generate --num 100000000", kind="exec", module="transformer.commands.generate", names="--num",
             limit="generate.num", argv=["{lm}", "--num", "100000000"]),
        dict(id="python -m evaluate, checkpoint model.max_len=10^9", kind="exec", module="transformer.commands.evaluate",
             names="model.max_len", limit="model.max_len",
             argv=["--checkpoint", "{tmp}/max_len_1e9.pt", "--device", "cpu"]),
    ]
    return found


CASES = cases()

# Runs the cases given as JSON on stdin, one process each, and prints one JSON result per case.
SERVER = r"""
import importlib, json, os, resource, signal, sys, time, traceback

KILL_SECONDS, KILL_RSS_KIB = 20.0, 2 << 20
cases = json.load(sys.stdin)
os.environ.pop("TRANSFORMER_SIZE_LIMITS", None)
for case in cases:  # imported before forking, so that a forked case pays no start-up
    if case["kind"] == "fork":
        importlib.import_module(case["module"])


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def child(case, out, err):
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a backstop for the machine
    if case["kind"] == "exec":
        os.execv(sys.executable, [sys.executable, "-m", case["module"], *case["argv"]])
    sys.argv = [case["module"], *case["argv"]]
    code = 1
    try:
        code = importlib.import_module(case["module"]).main()  # as the console script calls it
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


results = []
for i, case in enumerate(cases):
    out, err = f"{case['tmp']}/{i}.out", f"{case['tmp']}/{i}.err"
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(case, out, err)
        finally:
            os._exit(1)
    killed = None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        seconds, rss = time.monotonic() - start, rss_kib(pid)
        if seconds > KILL_SECONDS or rss > KILL_RSS_KIB:
            killed = f"killed after {seconds:.1f} s at {rss / 1024:.0f} MiB"
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    results.append({"id": case["id"], "code": os.waitstatus_to_exitcode(status), "killed": killed,
                    "seconds": time.monotonic() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                    "max_rss": usage.ru_maxrss * 1024,
                    "stdout": open(out, encoding="utf-8", errors="replace").read(),
                    "stderr": open(err, encoding="utf-8", errors="replace").read()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(tiny_run, tiny_lm, tmp_path_factory) -> dict[str, dict]:
    """Every case of `CASES` run once, by id."""
    tmp = tmp_path_factory.mktemp("size_limits")
    ckpt = tiny_run / "checkpoints" / "step_1.pt"
    state = load_checkpoint(ckpt)
    state.pop("format")
    variants, lm_variants = tmp / "variants", tmp / "lm_variants"
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        config = json.loads(json.dumps(state["config"]))
        config[section][name] = scaled(config[section][name])
        save_checkpoint({**state, "config": config}, variants / f"{key}.pt")
    config = json.loads(json.dumps(state["config"]))
    config["model"]["max_len"] = 10**9
    save_checkpoint({**state, "config": config}, tmp / "max_len_1e9.pt")
    lm = torch.load(tiny_lm, weights_only=True)
    lm_variants.mkdir()
    for name in generate.LM_SIZES:
        torch.save({**lm, "settings": {**lm["settings"], name: scaled(lm["settings"][name])}}, lm_variants / f"{name}.pt")
    saved = load_config(tiny_run / "config.yaml")
    fill = {"ckpt": str(ckpt), "lm": str(tiny_lm), "config": str(tiny_run / "config.yaml"), "tmp": str(tmp),
            "variants": str(variants), "lm_variants": str(lm_variants),
            **{key.replace(".", "_"): str(scaled(getattr(getattr(saved, key.split(".")[0]), key.split(".")[1])))
               for key in CONFIG_KEYS}}  # an option that defaults to the checkpoint's value
    jobs = [{**case, "tmp": str(tmp), "argv": [arg.format(**fill) for arg in case["argv"]]} for case in CASES]
    done = subprocess.run([sys.executable, "-c", SERVER], input=json.dumps(jobs), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {result["id"]: result for result in json.loads(done.stdout)}


LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d )?(DEBUG|INFO|WARNING)[: ]")


def error_line(stderr: str) -> str:
    """The one error line of `stderr`: argparse's usage block and log records may come before it, nothing else."""
    lines = [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert "Traceback" not in stderr and lines, stderr
    if lines[0].startswith("usage: "):  # argparse: the usage block, then "PROG: error: ..."
        usage = [i for i, line in enumerate(lines) if line.startswith("usage: ")]
        assert usage == [0] and all(line.startswith(" ") for line in lines[1:-1]), stderr
    else:
        assert len(lines) == 1, stderr
    assert re.match(r"^(transformer-[a-z]+: )?error: ", lines[-1]), stderr
    return lines[-1]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_a_size_far_above_its_default_is_one_line_error_quickly_and_in_little_memory(case, results):
    result = results[case["id"]]
    assert result["killed"] is None, f"{result['killed']}: {result['stderr'][-2000:]}"
    assert result["code"] not in (0, None) and result["stdout"] == "", result
    line = error_line(result["stderr"])
    assert case["names"] in line and f"{SIZE_LIMITS_ENV}={case['limit']}=" in line, line
    seconds = result["seconds"] if case["kind"] == "fork" else result["cpu_seconds"]
    assert seconds < SECONDS, result
    assert result["max_rss"] < GIB, result


def test_every_numeric_setting_is_bounded_or_said_not_to_size_memory():
    numeric = {f"{section}.{key}" for section, values in DEFAULTS.items() for key, value in values.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric - set(CONFIG_KEYS) - set(NOT_SIZES) == set(), "classify the new setting: a limit or NOT_SIZES"
    assert set(CONFIG_KEYS) & set(NOT_SIZES) == set()
    for module_name, (module, _) in COMMANDS.items():
        for action in numeric_options(module):
            option = action.option_strings[-1]
            assert hasattr(action.type, "size_key") or option in OPTIONS_NOT_SIZES, \
                f"{module_name} {option}: bound it with bounded_int or add it to OPTIONS_NOT_SIZES"
    assert {case["limit"] for case in CASES} >= set(SIZE_LIMITS)  # every limit is exercised


def test_the_environment_raises_a_limit_and_a_malformed_one_is_one_line(monkeypatch):
    big = ["model.d_model=32768", "model.n_heads=8"]
    with pytest.raises(ConfigError, match=f"model.d_model=32768 is above the limit of 16384.*{SIZE_LIMITS_ENV}"):
        load_config(None, big)
    parse = bounded_int("decode.beam_size")
    with pytest.raises(argparse.ArgumentTypeError, match="2048 is above the limit of 1024 on decode.beam_size"):
        parse("2048")
    monkeypatch.setenv(SIZE_LIMITS_ENV, "model.d_model=32768, decode.beam_size=4096")
    assert load_config(None, big).model.d_model == 32768
    assert parse("2048") == 2048 and size_limit("decode.beam_size") == 4096
    assert size_limit("model.max_len") == SIZE_LIMITS["model.max_len"]  # the others keep theirs
    for bad in ("model.dmodel=5", "model.d_model", "model.d_model=big", "model.d_model=-1", "decode.max_len_a=nan"):
        monkeypatch.setenv(SIZE_LIMITS_ENV, bad)
        with pytest.raises(ConfigError) as error:
            load_config(None)
        assert str(error.value).startswith(f"{SIZE_LIMITS_ENV}: ") and "\n" not in str(error.value)
        with pytest.raises(argparse.ArgumentTypeError, match=SIZE_LIMITS_ENV):
            parse("4")


def test_the_documented_limits_are_the_limits():
    text = (ROOT / "docs" / "run-folder.md").read_text(encoding="utf-8")
    documented = {key: float(value) for key, value in re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| ([\d.]+) \|", text, re.M)}
    assert documented == {key: float(value) for key, value in SIZE_LIMITS.items()}
