"""The `selfalign` command: a thin layer that parses options and calls the library."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from selfalign import __version__
from selfalign.cli import evaluate as evaluate_commands
from selfalign.cli import preferences as preference_commands
from selfalign.cli import push as push_commands
from selfalign.cli import sweep as sweep_commands
from selfalign.cli.configs import configs_app
from selfalign.cli.train import train_app
from selfalign.errors import SelfAlignError

app = typer.Typer(
    name="selfalign",
    help="Self-alignment of LLMs for harmlessness, measured against what it costs in helpfulness.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Prepare and inspect models.", no_args_is_help=True)
data_app = typer.Typer(help="List, show and validate data sets.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(configs_app, name="configs")
preference_commands.register(app)
evaluate_commands.register(app)
sweep_commands.register(app)
push_commands.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfalign {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from rich.logging import RichHandler

    from selfalign.progress import console

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@models_app.command("prepare")
def models_prepare(
    model: Annotated[str, typer.Argument(help="Model reference; see `selfalign models prepare --help`.")] = (
        "embedded:gemma-3-270m"
    ),
) -> None:
    """Fetch or convert MODEL into the local cache and print where it is.

    MODEL is embedded:gemma-3-270m (default), a Hugging Face id ORG/NAME, a local model folder or a .gguf file.
    """
    from selfalign.models.loading import prepare_model_files

    typer.echo(prepare_model_files(model))


@app.command("generate")
def generate(
    prompts: Annotated[Path, typer.Option("--prompts", help="JSON Lines (or .json/.csv/.parquet) file of prompts.")],
    out: Annotated[Path, typer.Option("--out", help="Output .jsonl: one row per input row, in order.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model reference.")] = "embedded:gemma-3-270m",
    prompt_column: Annotated[str, typer.Option(help="Column holding the prompt text.")] = "prompt",
    prompt_format: Annotated[str, typer.Option(help="auto, chat-template, plain, mistral-inst or a .yaml.")] = "auto",
    system_prompt: Annotated[str | None, typer.Option(help="System message put before every prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(min=0, help="Ban repeating token n-grams (transformers).")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); added to the format's own.")] = None,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
) -> None:
    """Answer every prompt in a file with one model; write prompt, completion and token counts per row."""
    from selfalign.backends.base import GenerationParams
    from selfalign.generation import GenerateConfig, generate_file

    config = GenerateConfig(
        model=model,
        prompt_column=prompt_column,
        prompt_format=prompt_format,
        system_prompt=system_prompt,
        batch_size=batch_size,
        dtype=dtype,
        params=GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            stop=list(stop or []),
            seed=seed,
        ),
    )
    summary = generate_file(config, prompts, out)
    typer.echo(summary)


def _is_override(argument: str) -> bool:
    """`judge.template=my-judge.yaml` is a setting, `runs/a=b/run.yaml` a config file: a setting starts with a
    dotted key and `=`, and is not a file that exists."""
    return re.match(r"[A-Za-z_][\w.]*=", argument) is not None and not Path(argument).is_file()


@app.command("run")
def run_command(
    config: Annotated[
        str | None,
        typer.Argument(help="Run config YAML (default: the packaged demo, see `selfalign configs`), then key=value."),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value settings, e.g. rounds=2.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Rerun this stage and every stage after it.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this stage (its inputs must exist).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print which stages would run and which are cached.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="If another run holds the run folder, wait for it instead of stopping.")
    ] = False,
) -> None:
    """Run the whole loop: tune-judge, preferences, SFT, DPO, evaluate, report; cached stages are skipped."""
    from selfalign.pipeline import run_pipeline
    from selfalign.pipeline.config import DEFAULT_CONFIG, load_run_config
    from selfalign.pipeline.engine import print_plan

    if config is not None and _is_override(config):
        overrides, config = [config, *(overrides or [])], None
    if config is None:  # say which file runs: a configs/demo.yaml in this folder is not it unless named
        typer.echo(f"config: {DEFAULT_CONFIG} (the packaged demo; `selfalign configs copy demo` for a copy)", err=True)
    run_config = load_run_config(config, overrides)
    plan, manifest = run_pipeline(run_config, from_stage=from_stage, only=only, dry_run=dry_run, wait=wait)
    typer.echo(print_plan(plan))
    if manifest is not None:
        from rich.console import Console
        from rich.table import Table

        from selfalign.pipeline.engine import format_gb, format_tokens

        table = Table("stage", "ran", "seconds", "peak RSS", "tokens", "folder")
        for name, stage in manifest["stages"].items():
            table.add_row(
                name,
                "yes" if stage["ran"] else "cached",
                str(stage.get("seconds", "")),
                format_gb(stage.get("peak_rss_kb")),
                format_tokens(stage.get("tokens")),
                stage["folder"],
            )
        Console().print(table)
        typer.echo(f"peak resident memory of this run: {format_gb(manifest.get('peak_rss_kb'))}")
        typer.echo(f"report: {Path(run_config.out) / 'report.md'}; manifest: {Path(run_config.out) / 'run.json'}")


@app.command("tune-judge")
def tune_judge_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json, results.md, results.png, judge.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value settings, e.g. limit=40 objective=accuracy.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Judge model reference.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with tune-judge settings.")] = None,
    labeled: Annotated[str | None, typer.Option(help="Labeled data reference (default builtin:judge-labeled).")] = None,
    limit: Annotated[int | None, typer.Option(min=2, help="At most this many items per split.")] = None,
    latency_budget: Annotated[float | None, typer.Option(help="Most seconds per item for the chosen judge.")] = None,
) -> None:
    """Compare every judge template x mode on labeled data; name the best and write judge.yaml for the pipeline."""
    from selfalign.config import load_config
    from selfalign.judging.tuning import TuneJudgeConfig, tune_judge

    options = {"model.model": model, "labeled": labeled, "limit": limit, "latency_budget": latency_budget}
    settings = [f"{key}={value}" for key, value in options.items() if value is not None]
    tune_config = load_config(TuneJudgeConfig, config, [*settings, *(overrides or [])])
    summary = tune_judge(tune_config, out)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    typer.echo(f"best judge: {summary['best']} (written to {out / 'judge.yaml'})")


@data_app.command("list")
def data_list() -> None:
    """List the built-in data sets: name, rows per split, columns, description."""
    from rich.console import Console
    from rich.table import Table

    from selfalign.data.catalog import describe_builtin_sets

    table = Table("name", "rows", "columns", "description")
    table.columns[0].no_wrap = True  # references are meant to be copied whole
    for entry in describe_builtin_sets():
        table.add_row(entry["reference"], entry["rows"], entry["columns"], entry["description"])
    Console().print(table)  # stdout, so that `selfalign data list | grep ...` works


@data_app.command("show")
def data_show(
    reference: Annotated[str, typer.Argument(help="builtin:NAME[:split], a data file, or hf:ORG/NAME[:split].")],
    n: Annotated[int, typer.Option("-n", min=1, help="Rows to show.")] = 5,
) -> None:
    """Print the first N rows of a data set as JSON lines."""
    from selfalign.data.jsonl import dumps_row
    from selfalign.data.loading import read_reference_rows

    name = reference if ":" in reference or Path(reference).suffix else f"builtin:{reference}"
    for row in read_reference_rows(name)[:n]:
        typer.echo(dumps_row(row))


@data_app.command("validate")
def data_validate(
    path: Annotated[str, typer.Argument(help="A data file or reference.")],
    columns: Annotated[str, typer.Option(help="Comma-separated columns every row must have.")] = "prompt",
) -> None:
    """Check that a data file parses and has the columns (labels, if asked for, must be 0 or 1)."""
    from selfalign.data.loading import validate_rows

    typer.echo(validate_rows(path, [c.strip() for c in columns.split(",") if c.strip()]))


@data_app.command("audit")
def data_audit(
    reference: Annotated[
        str, typer.Argument(help="A labeled set: judge-labeled, builtin:NAME, or a file with a dev/test split column.")
    ],
    aim: Annotated[
        float | None, typer.Option(help="Exit 1 when the cue classifier or the no-model rule scores above this.")
    ] = None,
) -> None:
    """Measure how well style alone labels a judge set: a cue classifier and the no-model rule, fit on dev, scored
    on test. A measurement, so it exits 0 unless --aim is given and exceeded."""
    from selfalign.judging.audit import audit_labeled, audit_lines

    name = reference if ":" in reference or Path(reference).suffix else f"builtin:{reference}"
    result = audit_labeled(name)
    for line in audit_lines(result):
        typer.echo(line)
    if aim is not None and result.exceeds(aim):
        typer.echo(f"{name}: above the aim: {'; '.join(result.exceeds(aim))}", err=True)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    from selfalign.allocator import keep_large_blocks_for_reuse

    keep_large_blocks_for_reuse()
    try:
        app()
    except SelfAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished work is kept and a rerun resumes from it", err=True)
        sys.exit(130)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """A process that `accelerate launch` started destroys its process group before it exits, as PyTorch asks:
    otherwise gloo's worker threads can abort the interpreter's teardown after training has finished (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291). Once per process, not per trainer,
    since `selfalign run` trains SFT and then DPO in one process group."""
    distributed = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
