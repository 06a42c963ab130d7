"""Gym-venv side: serve one environment's NeMo Gym resources server on a port, without ``ng_run``.

``python -m gymrl.envs.serve --env NAME --port PORT [--module PACKAGE] [--options JSON]`` (run by the harness
with the NeMo Gym venv's Python; ``--module`` is the plugin package, ``environments.NAME`` by default, and
``--options`` the server config's keys from a NeMo Gym config YAML). It builds the server's config and a ServerClient with no head server, exactly the pieces
NeMo Gym's own ``run_webserver`` builds, and serves the FastAPI app with uvicorn.
"""

import argparse
import importlib
import inspect
import json
import os
import signal
import threading
import time
import typing

import uvicorn
from nemo_gym.base_resources_server import SimpleResourcesServer
from nemo_gym.global_config import NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME
from nemo_gym.server_utils import BaseServerConfig, ServerClient
from omegaconf import OmegaConf


def server_class(package: str, entrypoint: str = "app.py") -> type[SimpleResourcesServer]:
    module = importlib.import_module(f"{package}.{entrypoint.removesuffix('.py')}")
    found = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, SimpleResourcesServer)
        and obj.__module__ == module.__name__ and not inspect.isabstract(obj)
        and "[" not in obj.__name__  # a generic base's parametrisation (aviary's AviaryResourcesServer[Env, Data])
    ]
    if len(found) != 1:
        raise SystemExit(f"{module.__name__} must define exactly one resources server class, found {len(found)}")
    return found[0]


def resolve_options(options: dict) -> dict:
    """A NeMo Gym config's ``${oc.env:NAME,default}`` (and other resolvable) interpolations resolved as ng_run
    resolves them; an option whose interpolation points outside the server's own entry stays as written."""
    resolved = {}
    for key, value in options.items():
        try:
            resolved[key] = OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"]
        except Exception:  # omegaconf raises several types for an unresolvable reference
            resolved[key] = value
    return resolved


def build_app(env: str, host: str, port: int, package: str | None = None, options: dict | None = None):
    """``options``: the server config's keys; ``entrypoint`` among them names the file of ``package`` that holds the
    server (app.py when absent)."""
    options = dict(options or {})
    entrypoint = options.pop("entrypoint", "app.py")
    cls = server_class(package or f"environments.{env}", entrypoint)
    config_cls = cls.model_fields["config"].annotation
    config = config_cls(**{"domain": "other", **resolve_options(options), "host": host, "port": port,
                           "entrypoint": entrypoint, "name": env})
    # NeMo Gym's aiohttp client (a judge's or a web API's requests) reads the global config; unset, it parses this
    # process's argv with Hydra, which exits on serve.py's flags. ng_run hands its servers the config this way.
    os.environ.setdefault(NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME, OmegaConf.to_yaml(OmegaConf.create({})))
    client = ServerClient(head_server_config=BaseServerConfig(host=host, port=port), global_config_dict=OmegaConf.create({}))
    server = cls(config=config, server_client=client)
    app = server.setup_webserver()
    server.setup_liveness(app)  # GET / -> {"status": "ok"}, the harness's health check
    add_verify_batch(app, server)
    return app


def exit_with_parent(parent_pid: int) -> None:
    """End this server when the harness that started it is gone (killed with SIGKILL, say): a thread checks
    every second that the parent still runs, so no orphan server keeps its port. The server's whole process group
    goes (the harness starts it as a group of its own): a NeMo Gym server's worker processes too."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                if os.getpgid(0) == os.getpid():  # the group is this server's own, not the caller's shell's
                    os.killpg(0, signal.SIGKILL)
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


# The verdict's own fields: a batch reply leaves out the echo of the request (the task row and the response).
ECHOED = ("responses_create_params", "response")


def add_verify_batch(app, server) -> None:
    """POST /verify_batch {"requests": [verify request, ...]} -> {"responses": [verdict, ...]}: many rollouts'
    /verify in one round trip (gymrl's addition; NeMo Gym's /verify is one rollout a request, and its HTTP and
    middleware cost several ms each, more than scoring an answer). Only for servers whose verify needs nothing but
    the request body (no session state): a tool environment's verify reads its session, so it gets no batch route
    and the harness falls back to /verify."""
    params = list(inspect.signature(server.verify).parameters)
    if params != ["body"]:
        return
    model = typing.get_type_hints(type(server).verify)["body"]

    @app.post("/verify_batch")
    async def verify_batch(payload: dict) -> dict:
        replies = []
        for item in payload["requests"]:
            verdict = (await server.verify(model.model_validate(item))).model_dump(mode="json", exclude=set(ECHOED))
            replies.append(verdict)
        return {"responses": replies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--module", default=None, help="plugin package (default: environments.ENV)")
    parser.add_argument("--options", default="{}", help="the server config's keys as a JSON object")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args()
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    uvicorn.run(build_app(args.env, args.host, args.port, args.module, json.loads(args.options)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
