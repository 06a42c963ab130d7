"""The ``gymrl`` command: train, eval, export, bench, envs, traces."""

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table

from gymrl.config import ConfigError, describe_fields, load_config
from gymrl.envs.client import EnvServerError
from gymrl.errors import USER_ERRORS, console, fail
from gymrl.traces.cli import traces_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="gymrl: RL environment harness for language models.")
envs_app = typer.Typer(no_args_is_help=True, help="Environment plugins.")
app.add_typer(envs_app, name="envs")
app.add_typer(traces_app, name="traces")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key] = yaml.safe_load(value)
    return out


def _print_config_help() -> None:
    table = Table("key", "default", "description", title="gymrl run config")
    for key, default, desc in describe_fields():
        table.add_row(key, default, desc)
    Console().print(table)


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML run config, e.g. configs/demo.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.steps=10 (repeatable)."),
    help_config: bool = typer.Option(False, "--help-config", help="List every config key with its default."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config and print where everything would run; "
                                                          "start nothing, load no weights."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder from its latest "
                                          "checkpoint, with its saved config (--set may change keys, e.g. train.steps)."),
) -> None:
    """Run GRPO on the configured environment and model. SIGTERM or Ctrl-C stops after the current step
    with a checkpoint; `--resume RUN_DIR` continues from it."""
    if help_config:
        _print_config_help()
        return
    if config is None and resume is None:
        fail(ConfigError("give a config file, e.g. gymrl train configs/demo.yaml, or --resume RUN_DIR"))
    if config is not None and resume is not None:
        fail(ConfigError("--resume takes the run's own config (RUN_DIR/config.json): give one or the other"))
    checkpoint = None
    try:
        if resume is not None:
            from gymrl.train.checkpoint import latest_checkpoint

            config = resume / "config.json"
            checkpoint = latest_checkpoint(resume)
            if checkpoint is None:
                raise FileNotFoundError(f"nothing to resume in '{resume}': no checkpoint under {resume / 'checkpoints'}")
        cfg = load_config(config, _overrides(set_))
    except USER_ERRORS as err:
        fail(err)
    if dry_run:
        from gymrl.plan import make_plan, render

        try:
            plan = make_plan(cfg)
        except USER_ERRORS as err:
            fail(err)
        render(plan, str(config), Console())
        return
    from gymrl.rollout.pool import EngineError
    from gymrl.session import start_session
    from gymrl.traces.store import TraceDiskFull
    from gymrl.train.checkpoint import CheckpointError, latest_checkpoint
    from gymrl.train.loop import train as run_training
    from gymrl.train.producer import TooManyFailures
    from gymrl.train.progress import TrainProgress
    from gymrl.train.sharded import TrainerRankError

    try:
        with console.status("starting: environment, model, Ray and vLLM engine(s)..."):
            session = start_session(cfg)
    except USER_ERRORS + (EnvServerError, EngineError) as err:
        fail(err)
    try:
        with TrainProgress(cfg.train.steps, console) as progress:
            summary = run_training(session, progress.update, checkpoint)
    except USER_ERRORS + (EnvServerError, EngineError, CheckpointError, TooManyFailures, TraceDiskFull,
                          TrainerRankError) as err:
        last = latest_checkpoint(Path(cfg.run_dir))
        fail(RuntimeError(f"{err}\nthe run stopped; " + (
            f"its last checkpoint is {last}: continue with `gymrl train --resume {cfg.run_dir}`" if last
            else "it saved no checkpoint")))
    finally:
        session.close()
    console.print_json(json.dumps(summary))
    console.print(f"run directory: {cfg.run_dir} (metrics.jsonl, traces.db, reward_curve.png, length_curve.png, checkpoint/)")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run folder (its latest checkpoint, or checkpoint/ when it has no "
                                            "step checkpoints) or one checkpoint folder."),
    out: Path = typer.Argument(..., help="New or empty folder for the HF model; with --gguf, a new .gguf file."),
    step: int | None = typer.Option(None, "--step", help="Export this step's checkpoint of the run folder."),
    gguf: bool = typer.Option(False, "--gguf", help="Write one GGUF file (float32, tokenizer and chat template "
                                                    "included) that llama.cpp loads, instead of an HF folder."),
) -> None:
    """Export a checkpoint as an HF safetensors model folder (transformers and vLLM load it), or as GGUF."""
    from gymrl.models.gguf_export import GGUFExportError
    from gymrl.train.checkpoint import CheckpointError, export_gguf, export_hf, find_checkpoint

    try:
        checkpoint = find_checkpoint(source, step)
        console.print(f"exporting {checkpoint} -> {out}", highlight=False)
        if gguf:
            export_gguf(checkpoint, out)
            console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", highlight=False)
            return
        files = export_hf(checkpoint, out)
    except USER_ERRORS + (FileExistsError, CheckpointError, GGUFExportError) as err:
        fail(err)
    console.print(f"wrote {out}: {', '.join(files)}", highlight=False)


@app.command("eval")
def eval_(
    config: Path | None = typer.Argument(None, help="Run config whose envs, sampling, rollout and endpoint "
                                                       "sections apply (default: every key's default)."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="OpenAI-compatible server, e.g. "
                                           "http://127.0.0.1:8000 (vllm serve, llama.cpp's server)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Serve this checkpoint (RUN_DIR/checkpoints/"
                                              "step_N, a run folder or an HF folder) on gymrl's own vLLM engine."),
    env: str | None = typer.Option(None, "--env", help="Environments, comma-separated (default: the config's)."),
    n: int | None = typer.Option(None, "--n", min=1, help="First N held-out tasks of each environment (default all)."),
    samples: int = typer.Option(1, "--samples", min=1, help="Episodes per task: k of pass@k."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (default: sampling.temperature)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling (default: sampling.top_p)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Tokens per turn (default: sampling.max_tokens)."),
    concurrency: int | None = typer.Option(None, help="Episodes in flight at once (default: endpoint.concurrency)."),
    timeout: float | None = typer.Option(None, help="Seconds per request (default: endpoint.timeout_s)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder for traces.db and report.json/.md "
                                       "(default: runs/eval-DATE-TIME)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set endpoint.extra_body.repeat_penalty=1.0."),
) -> None:
    """Evaluate an endpoint or a checkpoint on environments' held-out tasks: multi-turn tool use through the
    environment servers, their verifiers, a report (mean reward, pass@1, pass@k, 95% CIs) and traces."""
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gymrl.config import apply_overrides, parse_config
    from gymrl.eval.endpoint import EndpointError
    from gymrl.eval.run import run_eval
    from gymrl.train.checkpoint import CheckpointError

    flags = {"run_dir": str(out or Path("runs") / _time.strftime("eval-%Y%m%d-%H%M%S")),
             "sampling.temperature": temperature, "sampling.top_p": top_p, "sampling.max_tokens": max_tokens,
             "endpoint.concurrency": concurrency, "endpoint.timeout_s": timeout}
    try:
        base = load_config(config).model_dump(mode="json", exclude_unset=True) if config else {"model": {"path": "."}}
        if env is not None:
            known = {e["name"]: e for e in base.get("envs", [])}
            base["envs"] = [known.get(name.strip(), {"name": name.strip()}) for name in env.split(",") if name.strip()]
        if checkpoint is not None:
            base["model"] = {"path": str(checkpoint)}
        data = apply_overrides(base, {k: v for k, v in flags.items() if v is not None} | _overrides(set_))
        cfg = parse_config(data, str(config or "gymrl eval"))
    except USER_ERRORS as err:
        fail(err)
    progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)

    def on_start(total: int):
        task = progress.add_task("eval", total=total)
        return lambda: progress.advance(task)

    try:
        with progress:
            result = run_eval(cfg, endpoint, checkpoint, n, samples, cfg.sampling, on_start)
    except USER_ERRORS + (EndpointError, EnvServerError, CheckpointError) as err:
        fail(err)
    typer.echo((result.run_dir / "report.md").read_text())
    console.print(f"run directory: {result.run_dir} (report.json, report.md, traces.db; gymrl traces stats "
                  f"{result.run_dir})", highlight=False)


@app.command()
def bench(
    config: Path = typer.Argument(Path("configs/demo.yaml"), help="Config whose model and engine are measured."),
    out: Path = typer.Option(Path("bench_results"), help="Folder for the results: JSON and Markdown per suite."),
    repeats: int = typer.Option(3, help="Repetitions of each timed measurement."),
    suite: str = typer.Option("all", help="core (engine, weight push, trainer step), envs (rewards, sandbox, /verify), "
                                          "traces (trace store writes and queries), spec (decode tokens/s with and "
                                          "without speculative decoding, acceptance), pool (engine pool vs its "
                                          "engines alone, in-flight weight updates), async (async vs sync GRPO: "
                                          "step time, overlap, held-out reward), vs-trl (gymrl sync and async vs "
                                          "TRL's GRPOTrainer at two model sizes), rollout (raw vLLM vs gymrl rollout "
                                          "tokens/s at two batch sizes, and where the time goes), all, or, not in "
                                          "all: mtp (speculative acceptance over a GRPO run with the MTP layer frozen "
                                          "vs trained; needs a config with MTP, e.g. configs/mtp_rl_cpu.yaml) and "
                                          "env-load (concurrent /verify calls on each environment server at rising "
                                          "concurrency: req/s, p50/p99, errors, the knee)."),
    large_config: Path | None = typer.Option(Path("configs/bench_small.yaml"), help="vs-trl: the second, larger "
                                                "model's config (CONFIG is the first); empty for CONFIG only."),
    steps: int = typer.Option(10, help="vs-trl and scale: training steps per run (step 1 is a warm-up, left out)."),
) -> None:
    """Benchmarks: raw vLLM vs harness rollout tokens/s, weight push, trainer step; speculative decoding;
    reward, env-server and trace-store speed; env-server load."""
    from gymrl.bench.args import BenchArgs
    from gymrl.bench.suites import run_suites

    run_suites(suite, BenchArgs(config, out, repeats, large_config, steps))


@envs_app.command("list")
def envs_list() -> None:
    """List gymrl's environment plugins (folders under environments/, installed entry points) and the NeMo Gym
    environments the installed nemo-gym ships (an `envs:` entry takes either: `name:` or `nemo_gym:`)."""
    from gymrl.envs.nemo_gym import NemoGymConfigError, load_server, shipped
    from gymrl.envs.registry import available, load_environment

    table = Table("name", "train tasks", "eval tasks", "options", title="gymrl plugins (envs: - name: NAME)")
    for name in available():
        env = load_environment(name)
        table.add_row(name, str(len(env.tasks("train"))), str(len(env.tasks("eval"))), json.dumps(env.config))
    Console().print(table)
    try:
        names = shipped()
    except NemoGymConfigError as err:
        console.print(f"NeMo Gym environments: {err}", highlight=False)
        return
    table = Table("name", "datasets here", "agents", title="NeMo Gym environments (envs: - nemo_gym: NAME)")
    for name in names:
        try:
            server = load_server(name)
        except NemoGymConfigError as err:
            table.add_row(name, f"[red]{err}[/]", "")
            continue
        here = [f"{d.type} ({sum(1 for _ in d.path.open())})" for d in server.datasets if d.path.is_file()]
        table.add_row(name, ", ".join(here) or "none", ", ".join(sorted(set(server.agents))))
    Console().print(table)
    console.print("docs/nemo_gym.md: which of them run here unchanged (gymrl envs conform)", highlight=False)


@envs_app.command("new")
def envs_new(name: str = typer.Argument(..., help="Name of the new environment (a Python identifier).")) -> None:
    """Scaffold environments/NAME: task rows, a NeMo Gym server, a config and a README, ready to test."""
    from gymrl.envs.authoring import scaffold

    try:
        path = scaffold(name)
    except (ValueError, FileExistsError) as err:
        fail(err)
    console.print(f"created {path}; check it with: gymrl envs test {name}")


@envs_app.command("test")
def envs_test(
    name: str = typer.Argument(..., help="Environment to check: a gymrl plugin, or a NeMo Gym environment (a "
                               "shipped server's name or a config YAML)."),
    max_tasks: int = typer.Option(20, help="Tasks checked per split."),
    tool_call_parser: str = typer.Option("qwen3_coder", help="vLLM parser for the gold episodes' tool calls (tool-use envs)."),
    install_deps: bool = typer.Option(True, help="Install a NeMo Gym server's own requirements first (a line says what)."),
) -> None:
    """Start the environment's server and check it: a plugin's gold answers must score 1 and known-bad answers 0;
    a NeMo Gym environment's recorded rollouts (data/example_rollouts.jsonl) must replay to their recorded rewards."""
    from gymrl.envs.authoring import check_environment
    from gymrl.envs.registry import available

    if name not in available():
        from gymrl.envs.conform import conform
        from gymrl.envs.nemo_gym import NemoGymConfigError, load_server

        try:
            load_server(name)
        except NemoGymConfigError as err:
            fail(ValueError(f"unknown environment '{name}': not a gymrl plugin ({', '.join(available())}); {err}"))
        result = conform(name, install_deps=install_deps, say=lambda line: console.print(line, highlight=False))
        console.print(f"{name}: {'OK' if result.conforms else 'FAILED'}: {'started' if result.started else 'did not start'}"
                      f"; {result.equal} of {result.rows} recorded rewards replayed equal. {result.reason}",
                      highlight=False)
        raise typer.Exit(0 if result.conforms else 1)
    try:
        report = check_environment(name, max_tasks, tool_call_parser=tool_call_parser)
    except (ValueError, EnvServerError) as err:
        fail(err)
    for failure in report.failures[:20]:
        console.print(f"  [red]x[/] {failure}", highlight=False)
    console.print(report.summary(), highlight=False)
    raise typer.Exit(0 if report.ok else 1)


@envs_app.command("conform")
def envs_conform(
    names: list[str] = typer.Argument(None, help="Shipped NeMo Gym resources servers (or their config YAMLs)."),
    all_: bool = typer.Option(False, "--all", help="Every resources server the installed nemo-gym ships."),
    out: Path = typer.Option(Path("docs/nemo_gym.md"), help="The table (Markdown; its JSON is written beside it)."),
    install_deps: bool = typer.Option(False, "--install-deps", help="Install each server's own requirements.txt "
                                      "first (pinned in requirements-gym-servers.lock; a line says what)."),
) -> None:
    """Replay NeMo Gym's recorded rollouts (data/example_rollouts.jsonl) through each server, unchanged: the
    recorded tool calls through its routes, then /verify; the rewards must equal the recorded ones."""
    from gymrl.envs.conform import conform, write_table
    from gymrl.envs.nemo_gym import NemoGymConfigError, shipped

    try:
        targets = shipped() if all_ else list(names or [])
    except NemoGymConfigError as err:
        fail(err)
    if not targets:
        fail(ValueError("name a NeMo Gym resources server (gymrl envs list shows them), or pass --all"))
    results = []
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[server]}"), console=console) as bar:
        task = bar.add_task("conformance", total=len(targets), server="")
        for name in targets:
            bar.update(task, server=str(name))
            results.append(conform(str(name), install_deps=install_deps, say=bar.console.print))
            r = results[-1]
            mark = "[green]ok[/]" if r.conforms else "[red]x[/]"
            bar.console.print(f"{mark} {r.server}: {r.equal} of {r.rows} rewards equal {r.reason}", highlight=False)
            bar.advance(task)
    write_table(results, out, "gymrl envs conform " + ("--all" if all_ else " ".join(map(str, targets)))
                + (" --install-deps" if install_deps else ""))
    console.print(f"{sum(r.conforms for r in results)} of {len(results)} conform; table in {out}")
    raise typer.Exit(0 if all(r.conforms for r in results) else 1)


@envs_app.command("serve")
def envs_serve(
    name: str = typer.Argument(..., help="Environment to serve."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
) -> None:
    """Serve the environment's NeMo Gym resources server in the foreground (Ctrl-C stops it)."""
    import os

    from gymrl.envs.launcher import DEFAULT_GYM_PYTHON, server_pythonpath
    from gymrl.envs.registry import plugin_module

    try:
        module = plugin_module(name)
    except ValueError as err:
        fail(err)
    os.environ["PYTHONPATH"] = server_pythonpath(module)
    os.execv(str(DEFAULT_GYM_PYTHON), [str(DEFAULT_GYM_PYTHON), "-m", "gymrl.envs.serve", "--env", name,
                                       "--module", module, "--host", host, "--port", str(port)])


if __name__ == "__main__":
    app()
