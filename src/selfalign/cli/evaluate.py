"""CLI commands to evaluate, compare and talk to model variants."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfalign.errors import SelfAlignError

AdapterOption = Annotated[
    list[str] | None, typer.Option("--adapter", "-a", help="NAME=PATH of a PEFT adapter (repeatable).")
]


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    adapters = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SelfAlignError(f"--adapter '{value}': expected NAME=PATH, e.g. dpo=runs/dpo/adapter")
        if name in adapters:
            raise SelfAlignError(f"--adapter: the name '{name}' is given twice")
        adapters[name] = path
    return adapters


def evaluate_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, samples.jsonl and the reports.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model reference.")] = None,
    adapter: AdapterOption = None,
    harmful: Annotated[str | None, typer.Option(help="Harmful prompts (default builtin:redteam:test).")] = None,
    benign: Annotated[str | None, typer.Option(help="Benign prompts (default builtin:benign-sensitive:test).")] = None,
    helpful: Annotated[str | None, typer.Option(help="Helpful prompts (default builtin:helpful:test).")] = None,
    judge: Annotated[Path | None, typer.Option(help="judge.yaml written by tune-judge.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with evaluation settings.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many prompts per set.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value settings.")] = None,
) -> None:
    """Evaluate the base model and each adapter: harmlessness, over-refusal, helpfulness, with intervals."""
    from selfalign.config import load_config
    from selfalign.evaluation.run import EvaluateConfig, evaluate

    options = {"model.model": model, "harmful": harmful, "benign": benign, "helpful": helpful, "limit": limit}
    settings = [f"{key}={value}" for key, value in options.items() if value is not None]
    evaluate_config = load_config(EvaluateConfig, config, [*settings, *(overrides or [])])
    updates = {}
    if adapter:
        updates["adapters"] = {**evaluate_config.adapters, **parse_adapters(adapter)}
    if judge is not None:
        from selfalign.judging.judge import load_judge_file

        updates["judge"] = load_judge_file(judge)
    metrics = evaluate(evaluate_config.model_copy(update=updates), out)
    typer.echo((out / "report.md").read_text(encoding="utf-8").split("## Harmlessness by category")[0])
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'samples.jsonl'}, {out / 'report.md'}, {out / 'report.html'}")
    del metrics


def compare_command(
    prompt: Annotated[str, typer.Argument(help="The request to answer.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Base model reference.")] = "embedded:gemma-3-270m",
    adapter: AdapterOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
) -> None:
    """Print the answers of the base model and each adapter to one prompt, side by side."""
    from rich.console import Console
    from rich.table import Table

    from selfalign.backends.base import GenerationParams
    from selfalign.backends.language_model import ModelConfig
    from selfalign.evaluation.run import BASE, EvaluationModels

    adapters = parse_adapters(adapter)
    table = Table(BASE, *adapters, show_lines=True)
    answers = []
    models = EvaluationModels(ModelConfig(model=model), adapters)  # one engine for all where the backend can
    try:
        for name in [BASE, *adapters]:
            variant = models.variant(name)
            answers.append(variant.answer([prompt], GenerationParams(max_new_tokens=max_new_tokens))[0].text)
            models.done_with(variant)
            del variant
    finally:
        models.close()
    table.add_row(*answers)
    Console().print(table)


def chat_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model reference.")] = "embedded:gemma-3-270m",
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter folder.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Talk to one model variant in the terminal (an empty line or Ctrl-D ends)."""
    from selfalign.backends.base import GenerationParams
    from selfalign.backends.language_model import ModelConfig, load_language_model

    variant = load_language_model(ModelConfig(model=model, adapter=adapter))
    variant.backend.show_progress = False
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        answer = variant.answer([list(history)], params)[0].text
        history.append({"role": "assistant", "content": answer})
        typer.echo(f"model> {answer}")


def rescore_command(
    eval_dir: Annotated[Path, typer.Argument(help="Folder written by `selfalign evaluate`.")],
    judge: Annotated[Path | None, typer.Option(help="judge.yaml (e.g. from tune-judge).")] = None,
    template: Annotated[str | None, typer.Option(help="Judge template name or .yaml.")] = None,
    mode: Annotated[str | None, typer.Option(help="generate or logprob.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Another model to judge with.")] = None,
) -> None:
    """Judge saved answers again with another judge, without generating; write new metrics beside the old."""
    from selfalign.backends.language_model import ModelConfig
    from selfalign.judging.judge import JudgeConfig, load_judge_file

    # a judge.yaml goes through the one loader (weights resolved beside it); flags on the command line then apply
    data = load_judge_file(judge).model_dump(exclude_unset=True) if judge is not None else {}
    if template:
        data.update(design="single", template=template)
    if mode:
        data["mode"] = mode
    if judge_model:
        data["model"] = ModelConfig(model=judge_model).model_dump()
    from pydantic import ValidationError

    from selfalign.config import format_validation_error
    from selfalign.evaluation.rescore import rescore

    try:
        judge_config = JudgeConfig.model_validate(data)
    except ValidationError as exc:
        raise SelfAlignError(format_validation_error(exc, str(judge or "command line"))) from None
    out, metrics = rescore(eval_dir, judge_config)
    for variant, entry in metrics["models"].items():
        harmless = entry["harmless"]
        rate = "n/a" if harmless["rate"] is None else f"{100 * harmless['rate']:.1f}%"
        typer.echo(f"{variant}: harmless {rate} (abstained {harmless['abstained']})")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
    app.command("compare")(compare_command)
    app.command("chat")(chat_command)
    app.command("rescore")(rescore_command)
