"""Conformance against NeMo Gym's own recordings: start a shipped resources server unchanged and replay each of
its ``data/example_rollouts.jsonl`` rows as NeMo Gym's ``simple_agent`` played it (``/seed_session`` with the
task row, the recorded response's function calls through the server's routes in order with the session's
cookies, then ``/verify`` with the row and the recorded response); gymrl's reward must equal the recorded one.

A server that cannot take part says why in one line: a dependency the NeMo Gym venv lacks, a route that needs
another server (an LLM judge's model server, which gymrl does not start), a setting NeMo Gym's env.yaml gives (an
API key, a judge's URL), a service or program that is not here, or no recorded response.
"""

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gymrl.envs import gymnasium
from gymrl.envs.base import message_text
from gymrl.envs.client import EnvClient, EnvServerError, Usage
from gymrl.envs.launcher import DEFAULT_GYM_PYTHON, EnvServer
from gymrl.envs.nemo_gym import NemoGymConfigError, NemoGymServer, load_server
from gymrl.envs.server_deps import SERVERS_LOCK, DependencyError, ensure_installed, installed

# Keys of a recorded rollout that /verify wrote (the verdict), not the task row the agent was given.
RECORDED = ("response", "reward")


@dataclass
class Conformance:
    """One server's replay: ``equal`` of ``replayed`` recorded rewards reproduced."""

    server: str
    started: bool = False
    rows: int = 0
    replayed: int = 0
    equal: int = 0
    reason: str = ""  # why it could not start or replay, or what differed (one line)
    mismatches: list[str] = field(default_factory=list)

    @property
    def conforms(self) -> bool:
        return self.started and self.rows > 0 and self.equal == self.rows


def task_row(rollout: dict[str, Any], task_keys: set[str] | None) -> dict[str, Any]:
    """The task row a recording was played from: the recording without what /verify added to it (the reward,
    the response, and, where the server ships example rows, every key those rows do not have: the verdict's
    own fields such as ``extracted_answer``), its ``responses_create_params`` without the unset (null) fields
    that NeMo Gym's dump writes out and its request model does not take back (``parallel_tool_calls: null``)."""
    row = {k: v for k, v in rollout.items()
           if k not in RECORDED and (task_keys is None or k in task_keys or k == "responses_create_params")}
    params = row.get("responses_create_params")
    if isinstance(params, dict):
        row["responses_create_params"] = {k: v for k, v in params.items() if v is not None}
    return row


def prompt_key(row: dict[str, Any]) -> str:
    """A row's input, compared as NeMo Gym plays it: a string and a one-part list of text are one prompt, and the
    keys a dump adds (``type: message``, null fields) do not count."""
    given = (row.get("responses_create_params") or {}).get("input")
    if isinstance(given, str):
        return json.dumps([["user", given]])

    def part(p: Any) -> str:
        if isinstance(p, dict) and "text" in p:
            return str(p["text"])
        return json.dumps({k: v for k, v in p.items() if v is not None and k != "type"} if isinstance(p, dict) else p,
                          sort_keys=True)

    messages = []
    for m in given if isinstance(given, list) else []:
        if isinstance(m, dict):
            content = m.get("content")
            text = content if isinstance(content, str) else "".join(part(p) for p in content or [])
            messages.append([m.get("role"), text])
    return json.dumps(messages)


def played_row(rollout: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The example row a recording was played from: the one with its prompt (of several, the one that agrees with
    most of the fields the recording kept). NeMo Gym's recordings drop task fields that /verify needs; the row
    has them all."""
    key = prompt_key(rollout)
    candidates = [e for e in examples if prompt_key(e) == key]
    if not candidates:
        return None
    return max(candidates, key=lambda e: sum(1 for k, v in e.items() if k in rollout and rollout[k] == v))


def example_rows(server: NemoGymServer) -> list[dict[str, Any]]:
    rows, _ = read_recordings(server.folder / "data" / "example.jsonl")
    return [r for r in rows if isinstance(r, dict)]


def opened_row(rollout: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The example row a gymnasium_agent recording was played from. Its recorded input is the row's with /reset's
    observation after it, and it keeps no task field but ``_ng_task_index`` (the row's place in the dataset),
    which picks among rows of one prompt (the GRL games' rows differ only in their seed)."""
    messages = json.loads(prompt_key(rollout))
    prompts = (json.dumps(messages), json.dumps(messages[:-1]))
    candidates = [k for k, e in enumerate(examples) if prompt_key(e) in prompts]
    index = rollout.get("_ng_task_index")
    if index in candidates:
        return examples[index]
    return examples[candidates[0]] if candidates else None


def missing_fields(error: str) -> list[str]:
    """The request fields a server's 422 names as missing (a recording that dropped part of its task row)."""
    return re.findall(r'"type":"missing","loc":\["body","(\w+)"', error)


def responses_usage(response: dict[str, Any]) -> dict[str, Any]:
    """A recorded response whose ``usage`` has chat-completions names (``prompt_tokens``, ``completion_tokens``:
    mrcr's recordings) with the same counts under the Responses-API names /verify validates."""
    usage = response.get("usage")
    if not isinstance(usage, dict) or "prompt_tokens" not in usage or "input_tokens" in usage:
        return response
    return response | {"usage": Usage(usage["prompt_tokens"], usage.get("completion_tokens") or 0).as_response_usage()}


def replay(client: EnvClient, row: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """One recorded episode through the server's routes; the verdict /verify gives it."""
    cookies = client.seed_session(row)
    for item in response.get("output") or []:
        if not isinstance(item, dict) or item.get("type") != "function_call":
            continue
        try:
            arguments = json.loads(item.get("arguments") or "{}")
        except json.JSONDecodeError:
            continue  # simple_agent answers bad arguments itself, without calling the server
        _, cookies = client.call_tool(item["name"], arguments, cookies)
    verdict = client.verify(row, responses_usage(response), cookies)
    if "reward" not in verdict:
        raise EnvServerError(f"/verify answered without a reward: {str(verdict)[:200]}")
    return verdict


def verdict_differences(verdict: dict[str, Any], rollout: dict[str, Any], row: dict[str, Any]) -> str:
    """Where the verdict's own fields (those the recording has beyond its task row) differ from the recorded ones:
    what the installed verifier read otherwise than the one that made the recording."""
    differ = [k for k in rollout if k not in row and k not in RECORDED and k in verdict and verdict[k] != rollout[k]]
    return "".join(f"; {k} {json.dumps(verdict[k])[:80]}, recorded {json.dumps(rollout[k])[:80]}" for k in differ[:2])


# How a mismatch says the server observed otherwise than the recording at some point of a gymnasium episode.
DIVERGED = "observed otherwise than the recording"


def replay_gymnasium(client: EnvClient, row: dict[str, Any], rollout: dict[str, Any]) -> tuple[float, str]:
    """One recorded episode as gymnasium_agent played it: /reset, then /step with each model turn of the recording
    (the recorded response, its output cut to that turn) until the episode ends. Its summed reward, and where the
    server first observed otherwise than the recording ("" nowhere; "/reset": the start the recording's input ends
    with; "/step N": the observation the recording has after its N-th turn), which a server drawing its states
    unseeded does."""
    observation, cookies = gymnasium.reset(client, row)
    recorded = json.loads(prompt_key(rollout))
    diverged = "" if observation is None or (recorded and recorded[-1] == ["user", observation]) else "/reset"
    response = rollout["response"]
    output = response.get("output") or []
    observed = [message_text(i) for i in output if isinstance(i, dict) and i.get("role") == "user"]
    total = 0.0
    for n, turn in enumerate(gymnasium.model_turns(output)):
        result, cookies = gymnasium.step(client, row, response | {"output": turn}, cookies)
        total += result.reward
        if result.done:
            break
        if not diverged and n < len(observed) and result.observation is not None and result.observation != observed[n]:
            diverged = f"/step {n + 1}"
    return total, diverged


def missing_dependency(log: str) -> str | None:
    found = re.findall(r"No module named '([\w.]+)'", log)
    return found[-1] if found else None


# Container runtimes a server's options may name as what runs its episodes (swerl_gen's ``env: singularity``).
RUNTIMES = ("singularity", "apptainer", "docker", "podman")


def missing_program(log: str, server: NemoGymServer) -> str | None:
    """A program a route runs that is not installed here: one the log says it could not find, or a container runtime
    its options name that is not on PATH (a Ray worker's log may not reach the server's before it stops)."""
    found = re.findall(r"No such file or directory: '([\w.+-]+)'", log)
    found += [v for v in server.options.values() if v in RUNTIMES and shutil.which(v) is None]
    return found[-1] if found else None


def unreachable_service(log: str, server: NemoGymServer) -> str | None:
    """A service the server connects to that does not answer here, named by its options' host, port or URL keys."""
    if not re.search(r"All connection attempts failed|Connection refused|Cannot connect to host", log):
        return None
    keys = [k for k in server.options if re.search(r"(_host|_port|_url|^url|^host|^port)$", k)]
    return f"a server at its {', '.join(keys) or 'configured address'}, which does not answer here"


def external_needs(server: NemoGymServer, log: str) -> str:
    """What outside gymrl the server needs and does not have here, in words ("" when nothing)."""
    needs = server.needs_servers()
    settings = server.global_settings()
    service = unreachable_service(log, server)
    required = sorted(set(re.findall(r"^(\w+)\n\s+Field required", log, re.M)))  # pydantic's error for its config
    return "; ".join(([f"model or resources servers {', '.join(needs)}"] if needs else [])
                     + ([f"settings NeMo Gym's env.yaml gives, unset here: {', '.join(settings)}"] if settings else [])
                     + ([f"config keys it requires and its YAML leaves out: {', '.join(required)}"] if required else [])
                     + ([service] if service else []))


def last_error(log: str) -> str:
    """The last line of a server's log that names an exception (what a 500 came from)."""
    lines = [line.strip() for line in log.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit)\b", line)]
    return lines[-1][:200] if lines else ""


def read_recordings(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The recorded rollouts of a server, and how many lines are not JSON (a Git LFS pointer, a cut-off line)."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def dropped_fields(rows: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> list[str]:
    """Task fields every example row has and no recording kept."""
    common = set.intersection(*(set(r) for r in rows)) if rows and rollouts else set()
    return sorted(common - {k for r in rollouts for k in r})


def explain(errors: list[str], mismatches: list[str], log: str, server: NemoGymServer, dropped: list[str],
            unmatched: int = 0, verdicts_differ: bool = False) -> str:
    """Why a server's replay fell short, in one line ("" when every recorded reward came back). ``verdicts_differ``:
    a verdict's own fields (an extracted answer) differ from the recording's for the same recorded response."""
    if not errors and not mismatches:
        return ""
    first = (errors or mismatches)[0]
    dependency = missing_dependency(log)
    if dependency:
        return f"dependency not installed in .venv-gym: {dependency} (imported by a route); {first}"
    if server.agents and not {"simple_agent", gymnasium.AGENT} & set(server.agents):
        return f"played by NeMo Gym's {', '.join(server.agents)}, whose routes are not simple_agent's: {first}"
    lacking = sorted({f for e in errors for f in missing_fields(e)} - set(RECORDED))
    if lacking:
        other = f" and {unmatched} are of prompts no example row has" if unmatched else ""
        return f"the recordings lack task fields the server requires ({', '.join(lacking)}){other}: {first}"
    if not errors and any(DIVERGED in m for m in mismatches):
        return ("the server's episodes went otherwise than the recorded ones (it draws their states anew, unseeded, "
                f"so that an observation differs): {first}")
    needs = external_needs(server, log)
    program = missing_program(log, server)
    cause = last_error(log) if errors else ""
    return ((f"needs an external service ({needs}): " if needs else "")
            + (f"needs a program not installed here ({program}, run by a route): " if program and not needs else "")
            + ("the recordings were scored otherwise than the installed verifier scores the same response (another "
               "version of it, or a nondeterministic one): " if verdicts_differ and not (needs or program or errors)
               else "")
            + first
            + (f" (the recordings lack the example rows' {', '.join(dropped)})" if dropped else "")
            + (f"; server log: {cause}" if cause else ""))


def conform(name: str, gym_python: Path = DEFAULT_GYM_PYTHON, log_dir: Path | None = None,
            start_timeout_s: float = 60.0, request_timeout_s: float = 30.0, install_deps: bool = False,
            say: Callable[[str], None] = print, lock: Path = SERVERS_LOCK) -> Conformance:
    """Start ``name`` (a shipped server, or a NeMo Gym config YAML) and replay its recordings. A request that
    times out ends the server's replay (a route that waits on a service, or on a batch, would time out again).
    ``install_deps``: install the server's own requirements first (:mod:`gymrl.envs.server_deps`), saying so
    with ``say``; without it, a server's packages are used where an earlier install left them."""
    result = Conformance(name)
    try:
        server = load_server(name, gym_python)
    except NemoGymConfigError as err:
        result.reason = str(err)
        return result
    rollouts, unreadable = read_recordings(server.folder / "data" / "example_rollouts.jsonl")
    rollouts = [r for r in rollouts if isinstance(r, dict) and isinstance(r.get("response"), dict) and "reward" in r]
    result.rows = len(rollouts)
    folder_name = server.module.split(".")[-1]
    try:
        packages = (ensure_installed(folder_name, server.folder, gym_python, say, lock) if install_deps
                    else installed(gym_python, folder_name))
    except DependencyError as err:
        result.reason = f"dependency not installable here: {err}"
        return result
    env_server = EnvServer(server.name, gym_python, module=server.module, options=server.options, cwd=server.folder,
                           log_dir=log_dir, import_paths=[packages] if packages else None)
    try:
        env_server.start(start_timeout_s)
    except EnvServerError as err:
        log = env_server.log_path.read_text(errors="replace") if env_server.log_path.is_file() else str(err)
        dependency = missing_dependency(log)
        last = last_error(log) or (log.strip().splitlines() or [str(err)])[-1][:200]
        needs = external_needs(server, log)
        result.reason = (f"dependency not installed in .venv-gym: {dependency}" if dependency
                         else (f"needs an external service ({needs}): " if needs else "")
                         + (f"did not answer within {start_timeout_s:.0f} s: " if "did not answer" in str(err)
                            else "does not start: ") + last)
        return result
    result.started = True
    if not rollouts:
        result.reason = "no recorded response in data/example_rollouts.jsonl" + (
            f" ({unreadable} lines are not JSON)" if unreadable else "")
        env_server.stop()
        return result
    examples = example_rows(server)
    task_keys = {k for r in examples for k in r} or None
    played = [(opened_row if server.gymnasium else played_row)(r, examples) for r in rollouts]
    client = EnvClient(server.name, env_server.url, timeout_s=request_timeout_s, retries=0)
    errors, verdicts_differ = [], False
    try:
        for k, rollout in enumerate(rollouts):
            row = played[k] or task_row(rollout, task_keys)
            diverged, verdict, started = "", {}, time.perf_counter()
            try:
                if server.gymnasium:
                    reward, diverged = replay_gymnasium(client, row, rollout)
                else:
                    verdict = replay(client, row, rollout["response"])
                    reward = float(verdict["reward"])
            except EnvServerError as err:
                errors.append(f"row {k}: {str(err)[:200]}")
                if "Timeout" in str(err):
                    break
                continue
            result.replayed += 1
            if abs(reward - float(rollout["reward"])) < 1e-6:
                result.equal += 1
            else:
                differences = verdict_differences(verdict, rollout, row)
                # the replay's time: a verifier that gives up after a time limit (math-verify's 5 s) scores by CPU speed
                result.mismatches.append(f"row {k}: reward {reward:g}, recorded {float(rollout['reward']):g} "
                                         f"(replayed in {time.perf_counter() - started:.1f} s)"
                                         + (f" ({diverged} {DIVERGED})" if diverged else "") + differences)
                verdicts_differ = verdicts_differ or bool(differences)
    finally:
        client.close()
        env_server.stop()
    log = env_server.log_path.read_text(errors="replace") if env_server.log_path.is_file() else ""
    unmatched = [r for r, row in zip(rollouts, played) if row is None]
    result.reason = explain(errors, result.mismatches, log, server, dropped_fields(examples, unmatched), len(unmatched),
                            verdicts_differ)
    return result


# What keeps a server from conforming, by the start of its reason (the first match wins).
CATEGORIES = (
    ("dependency not installed", "a dependency .venv-gym lacks"),
    ("dependency not installable", "a dependency that cannot be installed here"),
    ("needs an external service", "needs an external service (an LLM judge's model server, a web API and its key, "
                                  "a sandbox) or a setting NeMo Gym's env.yaml gives"),
    ("needs a program", "needs a program not installed here (a container runtime)"),
    ("the recordings were scored otherwise", "its recordings were scored by another verifier than the installed one"),
    ("played by NeMo Gym's", "played by another NeMo Gym agent"),
    ("the server's episodes went otherwise", "its episodes go otherwise than the recorded ones (states drawn unseeded)"),
    ("the recordings lack", "its recordings lack task fields the server requires"),
    ("no recorded response", "no recorded rollouts"),
    ("does not start", "does not start here (network at start-up, a missing tool or service)"),
    ("did not answer", "does not start here (network at start-up, a missing tool or service)"),
)


def category(r: Conformance) -> str:
    if r.conforms:
        return "replays every recorded reward"
    for prefix, name in CATEGORIES:
        if r.reason.startswith(prefix):
            return name
    if "(the recordings lack" in r.reason:
        return "rewards differ where the recordings lack task fields"
    return "rewards differ, or a route fails"


def write_table(results: list[Conformance], path: Path, command: str = "gymrl envs conform") -> None:
    """The conformance table (Markdown, with a count per category) and its JSON beside it."""
    counts: dict[str, int] = {}
    for r in results:
        counts[category(r)] = counts.get(category(r), 0) + 1
    head = ["# NeMo Gym's environments under gymrl: conformance", "",
            f"Written by `{command}` on {time.strftime('%Y-%m-%d')}: each server started unchanged, its recorded "
            "rollouts (`data/example_rollouts.jsonl`) replayed as NeMo Gym's agent played them (simple_agent, or "
            "gymnasium_agent's /reset and /step), gymrl's "
            "reward compared with the recorded one (README: NeMo Gym's own environments).", "",
            f"{sum(r.conforms for r in results)} of {len(results)} servers replay every recorded reward exactly; "
            f"{sum(r.started for r in results)} start.", "", "| outcome | servers |", "| --- | --- |"]
    head += [f"| {name} | {n} |" for name, n in sorted(counts.items(), key=lambda c: -c[1])]
    lines = ["", "| server | starts | rewards equal (k of n) | reason |", "| --- | --- | --- | --- |"]
    for r in results:
        equal = f"{r.equal} of {r.rows}" if r.started and r.rows else "-"
        lines.append(f"| {r.server} | {'yes' if r.started else 'no'} | {equal} | {r.reason.replace('|', '/')} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps([asdict(r) | {"category": category(r)} for r in results],
                                                    indent=1) + "\n")
