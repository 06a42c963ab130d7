"""``gymrl bench --suite``: the table of suites and the loop that runs the chosen ones.

A suite is its module's ``run_suite``, which takes the bench arguments and returns its figures as a table, and
one entry in ``BENCH_SUITES`` (its status line, output files, the errors it reports in one line, and whether
``all`` runs it)."""

from collections.abc import Callable
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Table

from gymrl.bench import async_grpo, core, env_load, envs, mtp, pool, rollout, scale, spec, traces, vs_trl
from gymrl.bench.args import BenchArgs
from gymrl.envs.client import EnvServerError
from gymrl.errors import USER_ERRORS, console, fail


@dataclass(frozen=True)
class Suite:
    """One ``gymrl bench --suite`` entry: what it runs, the errors it reports in one line, the files it writes."""

    run: Callable[[BenchArgs], Table]  # the suite's figures as a table for the console
    status: str | Callable[[BenchArgs], str] | None = None  # shown while it runs
    outputs: tuple[str, ...] = ()  # files under --out, named when it is done
    errors: tuple[type[Exception], ...] = USER_ERRORS
    in_all: bool = True


# In the order `--suite all` runs them.
BENCH_SUITES: dict[str, Suite] = {
    "traces": Suite(traces.run_suite, "writing 100,000 synthetic rollouts..."),
    "envs": Suite(envs.run_suite, errors=(EnvServerError,)),
    "env-load": Suite(env_load.run_suite, "concurrent /verify calls on each environment server, concurrency 1, 2, 4, ...",
                      ("env-load.json", "env-load.md"), USER_ERRORS + (EnvServerError,), in_all=False),
    "spec": Suite(spec.run_suite, "decoding with and without speculative decoding, one engine at a time...",
                  ("spec.json", "spec.md"), USER_ERRORS + (RuntimeError,)),
    "mtp": Suite(mtp.run_suite, "GRPO with the MTP layer frozen, then trained, from the same weights...",
                 ("mtp.json", "mtp.md", "mtp_acceptance.png"), USER_ERRORS + (EnvServerError,), in_all=False),
    "async": Suite(async_grpo.run_suite, "GRPO sync then async from the same weights...", ("async.json", "async.md"),
                   USER_ERRORS + (EnvServerError,)),
    "vs-trl": Suite(vs_trl.run_suite, lambda a: f"gymrl sync, async and TRL, {a.steps} steps each, at "
                                                f"{len(vs_trl.configs_of(a))} model size(s)...",
                    ("vs-trl.json", "vs-trl.md", "vs-trl.png"), USER_ERRORS + (EnvServerError, RuntimeError)),
    "rollout": Suite(rollout.run_suite, None, ("rollout.json", "rollout.md"), USER_ERRORS + (EnvServerError,)),
    "pool": Suite(pool.run_suite, "two engines: alone, as a pool, and weight updates in flight...",
                  ("pool.json", "pool.md")),
    "core": Suite(core.run_suite, None, ("results.json", "results.md"), USER_ERRORS + (EnvServerError,)),
    "scale": Suite(scale.run_suite, lambda a: f"train.workers 1, then 2 (FSDP2 ranks on gloo), {a.steps} steps each "
                                              "on one fixed batch, then the weight gather per push_bucket_mb...",
                   ("scale.json", "scale.md"), in_all=False),
}
SUITES = (*BENCH_SUITES, "all")


def run_suites(suite: str, args: BenchArgs) -> None:
    """Run ``suite`` (a name in ``BENCH_SUITES``, or ``all``), printing each suite's table and the files it wrote;
    a bad argument or a suite's error ends the command with one line."""
    if suite not in SUITES:
        fail(ValueError(f"--suite must be {', '.join(SUITES[:-1])} or all, got '{suite}'"))
    if args.steps < 2:
        fail(ValueError(f"--steps must be at least 2 (step 1 is a warm-up), got {args.steps}"))
    for name, entry in BENCH_SUITES.items():
        if suite != name and not (suite == "all" and entry.in_all):
            continue
        try:
            status = entry.status(args) if callable(entry.status) else entry.status
            if status:
                with console.status(status):
                    table = entry.run(args)
            else:
                table = entry.run(args)
        except typer.Exit:  # an error already shown (click's Exit is a RuntimeError, which some suites catch)
            raise
        except entry.errors as err:
            fail(err)
        Console().print(table)
        if entry.outputs:
            console.print(f"results: {', '.join(str(args.out / f) for f in entry.outputs)}")
