"""Readers and checkers of deploy/, kept apart from the tests so each can be run on any text.

Every fact comes from the code: the commands and options of the real Typer app, the variables
of `Settings` (explainctl.config), the default queue of `Settings()`, the probe's own
argument parser.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SLURM = DEPLOY / "slurm"
PROBE_SCRIPT = DOCKER / "worker-probe.py"
PROBE = "explainctl-probe"

# boto3/botocore's own variables that these files may set; test_deploy checks each against
# botocore, so a typo here cannot pass.
STANDARD_AWS_VARIABLES = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    }
)


def deploy_files() -> list[Path]:
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- the real CLI


@cache
def cli_options() -> dict[str, frozenset[str]]:
    """Command name -> its option strings, from the Typer app itself ('' is the group)."""
    import typer

    from explainctl.cli.commands import app

    group = typer.main.get_command(app)

    def options(command: Any) -> frozenset[str]:
        found = {"--help"}
        for param in command.params:
            if getattr(param, "param_type_name", None) == "option":
                found.update(param.opts)
                found.update(param.secondary_opts)
        return frozenset(found)

    spec = {"": options(group)}
    for name, command in group.commands.items():
        spec[name] = options(command)
    return spec


@cache
def probe_module():
    spec = importlib.util.spec_from_file_location("explainctl_worker_probe", PROBE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def probe_options() -> frozenset[str]:
    parser = probe_module().build_parser()
    return frozenset(option for action in parser._actions for option in action.option_strings)


# --------------------------------------------------------------------------- invocations


@dataclass(frozen=True)
class Invocation:
    """One use of a command: `program` (explainctl or explainctl-probe) and what follows it."""

    where: str
    args: tuple[str, ...]
    program: str = "explainctl"


def _is_flag(token: str) -> bool:
    return len(token) > 1 and token.startswith("-") and not re.fullmatch(r"-[\d.]+", token)


def check_invocation(invocation: Invocation) -> list[str]:
    """Problems with one invocation: an unknown command, or an option it does not have."""
    if invocation.program == PROBE:
        return [
            f"{invocation.where}: {PROBE} has no option {flag}"
            for flag in (t.split("=", 1)[0] for t in invocation.args if _is_flag(t))
            if flag not in probe_options()
        ]
    spec = cli_options()
    args = invocation.args
    if not args:
        return []
    command, rest = (args[0], args[1:]) if not args[0].startswith("-") else ("", args)
    if command not in spec:
        known = ", ".join(sorted(c for c in spec if c))
        return [f"{invocation.where}: `explainctl {command}` is not a command ({known})"]
    shown = f"explainctl {command}".strip()
    return [
        f"{invocation.where}: `{shown}` has no option {flag}"
        for flag in (t.split("=", 1)[0] for t in rest if _is_flag(t))
        if flag not in spec[command]
    ]


def check_invocations(invocations: Iterable[Invocation]) -> list[str]:
    return [problem for invocation in invocations for problem in check_invocation(invocation)]


# `explainctl` as a program name: alone or in a bin/ directory, not part of another name
# (explainctl-worker, explainctl_worker.app, s3://explainctl/..., /home/explainctl, user=...).
_PROGRAM_RE = re.compile(
    r"(?<![\w.@:/=-])(?:(?:[\w.$-]*/)*bin/)?(explainctl(?:-probe)?)(?![\w.@:/'\"=-])"
)
# What may follow `explainctl` in a real command: a subcommand or an option (else it is prose).
_COMMAND_WORD_RE = re.compile(r"-.*|[a-z][a-z0-9-]*")
_TOKEN_RE = re.compile(r"\"[^\"]*\"|'[^']*'|\S+")
_STOP_RE = re.compile(r"[;|&`)<>]")
# docker compose run / docker run options that take a value (the value must be skipped).
_VALUE_OPTIONS = frozenset(
    {
        *("-e", "--env", "--env-file", "-v", "--volume", "-w", "--workdir", "-u", "--user"),
        *("-p", "--publish", "-l", "--label", "--name", "--entrypoint", "--network", "--mount"),
        *("--gpus", "--platform", "--cpus", "--memory", "-f", "--file", "--profile"),
        "--project-name",
    }
)


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    return token


def shell_tokens(text: str) -> list[str]:
    """Tokens up to the end of the command: a shell operator, a comment or a closing backtick."""
    tokens = []
    for token in _TOKEN_RE.findall(text):
        if token[0] in "\"'":
            tokens.append(_unquote(token))
            continue
        if token.startswith("#"):
            break
        stop = _STOP_RE.search(token)
        if stop:
            if token[: stop.start()]:
                tokens.append(token[: stop.start()])
            break
        tokens.append(token)
    return tokens


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with backslash continuations joined (a comment's `#` kept), with line numbers."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            piece = stripped[:-1]
            if pending:  # a continued comment line: drop its leading '#'
                piece = re.sub(r"^\s*#", " ", piece)
            pending += piece + " "
            continue
        if pending:
            line = re.sub(r"^\s*#", " ", line)
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def invocations_in_text(
    text: str, where: str, services: Mapping[str, str] | None = None
) -> list[Invocation]:
    """`explainctl ...` and `explainctl-probe ...` in shell-like text, plus
    `docker compose run SERVICE ...` (SERVICE in `services`, whose entrypoint is explainctl)
    and `docker run ... explainctl-worker|client:TAG ...`."""
    services = services if services is not None else {}
    found = []
    for number, line in logical_lines(text):
        place = f"{where}:{number}"
        for match in _PROGRAM_RE.finditer(line):
            args = tuple(shell_tokens(line[match.end() :]))
            program = match.group(1)
            if program == "explainctl" and args and not _COMMAND_WORD_RE.fullmatch(args[0]):
                continue
            found.append(Invocation(place, args, program))
        for match in re.finditer(r"docker compose\b(?P<rest>.*)", line):
            tokens = shell_tokens(match.group("rest"))
            tokens = _skip_options(tokens)
            if tokens[:1] == ["run"]:
                rest = _skip_options(tokens[1:])
                if rest and rest[0] in services:
                    found.append(Invocation(place, tuple(rest[1:]), services[rest[0]]))
        for match in re.finditer(r"docker run\b(?P<rest>.*)", line):
            rest = _skip_options(shell_tokens(match.group("rest")))
            if rest and image_dockerfile(rest[0]) is not None:
                found.append(Invocation(place, tuple(rest[1:])))
    return found


def _skip_options(tokens: list[str]) -> list[str]:
    index = 0
    while index < len(tokens) and tokens[index].startswith("-"):
        index += 2 if tokens[index] in _VALUE_OPTIONS else 1
    return tokens[index:]


def markdown_code(text: str) -> str:
    """The code of a Markdown text, line for line: fenced blocks whole, and the inline code
    spans of other lines (separated by `;`, which ends a command); prose becomes blank."""
    lines = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        elif fenced:
            lines.append(line)
        else:
            lines.append(" ; ".join(re.findall(r"`([^`]+)`", line)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- Dockerfiles


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*.Dockerfile"))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(path))
    return [
        (i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"
    ]


def exec_form(value: str) -> list[str] | None:
    """The list of an exec-form ENTRYPOINT/CMD (JSON), or None for the shell form."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed) else None


def dockerfile_command(path: Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of a Dockerfile in exec form ([] where absent)."""
    entrypoint: list[str] = []
    command: list[str] = []
    for instruction, value in dockerfile_instructions(path):
        if instruction == "ENTRYPOINT":
            entrypoint = exec_form(value) or ["/bin/sh", "-c", value]
        elif instruction == "CMD":
            command = exec_form(value) or ["/bin/sh", "-c", value]
    return entrypoint, command


def healthcheck_command(path: Path) -> list[str] | None:
    for instruction, value in dockerfile_instructions(path):
        if instruction == "HEALTHCHECK":
            _, _, command = value.partition("CMD")
            return exec_form(command.strip()) or ["/bin/sh", "-c", command.strip()]
    return None


def image_dockerfile(image: str) -> Path | None:
    """The Dockerfile behind an image name like registry/explainctl-worker:0.1.0."""
    match = re.fullmatch(r"(?:.*/)?explainctl-(\w+)(?::[\w.${}:-]+)?", image)
    if not match:
        return None
    path = DOCKER / f"{match.group(1)}.Dockerfile"
    return path if path.exists() else None


def program_invocation(argv: list[str], where: str) -> Invocation | None:
    """An Invocation when argv runs explainctl or explainctl-probe."""
    if not argv:
        return None
    program = Path(argv[0]).name
    if program in ("explainctl", PROBE):
        return Invocation(where, tuple(argv[1:]), program)
    return None


def dockerfile_invocations(path: Path) -> list[Invocation]:
    entrypoint, command = dockerfile_command(path)
    found = []
    main = program_invocation(entrypoint + command, f"{rel(path)} ENTRYPOINT+CMD")
    if main:
        found.append(main)
    health = healthcheck_command(path)
    probe = health and program_invocation(health, f"{rel(path)} HEALTHCHECK")
    if probe:
        found.append(probe)
    return found


# --------------------------------------------------------------------------- YAML


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def k8s_manifests() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_manifests() for doc in load_yaml_documents(path)]


def find_k8s(kind: str, name: str | None = None) -> list[dict]:
    return [
        doc
        for _, doc in k8s_documents()
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def pod_specs(doc: Mapping) -> list[Mapping]:
    """The pod specs inside a workload (Deployment, StatefulSet, Job, CronJob, Pod)."""
    kind = doc.get("kind")
    spec = doc.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def container_argv(container: Mapping) -> list[str]:
    """What a container runs: its command, or its image's ENTRYPOINT, then its args (or CMD)."""
    dockerfile = image_dockerfile(container.get("image", ""))
    entrypoint, default_cmd = dockerfile_command(dockerfile) if dockerfile else ([], [])
    if "command" in container:
        return list(container["command"]) + list(container.get("args", []))
    return entrypoint + list(container.get("args", default_cmd))


def container_exec_commands(container: Mapping) -> Iterator[tuple[str, list[str]]]:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container.get(probe, {}).get("exec", {}).get("command")
        if command:
            yield probe, list(command)
    for hook in ("postStart", "preStop"):
        command = container.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command")
        if command:
            yield hook, list(command)


def k8s_invocations() -> list[Invocation]:
    found = []
    for path, doc in k8s_documents():
        for pod in pod_specs(doc):
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                where = f"{rel(path)} {doc['kind']}/{doc['metadata']['name']}/{container['name']}"
                main = program_invocation(container_argv(container), where)
                if main:
                    found.append(main)
                for what, command in container_exec_commands(container):
                    other = program_invocation(command, f"{where} {what}")
                    if other:
                        found.append(other)
    return found


def container_env(container: Mapping, namespace_docs: Iterable[Mapping]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom (ConfigMaps and Secrets of
    `namespace_docs`), then env, with $(VAR) references expanded."""
    docs = list(namespace_docs)

    def source(kind: str, name: str) -> Mapping:
        for doc in docs:
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"{kind}/{name} is referenced but defined nowhere")

    env: dict[str, str] = {}
    for item in container.get("envFrom", []):
        if "configMapRef" in item:
            env.update(source("ConfigMap", item["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in item:
            env.update(source("Secret", item["secretRef"]["name"]).get("stringData", {}))
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\(([A-Za-z_]\w*)\)", lambda m: env.get(m[1], m[0]), item["value"])
            env[item["name"]] = value
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = source("Secret", ref["name"])["stringData"][ref["key"]]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = source("ConfigMap", ref["name"])["data"][ref["key"]]
    return {key: str(value) for key, value in env.items()}


def k8s_namespace_docs() -> list[dict]:
    """Every document, the Secret templates included (as a cluster would hold them)."""
    return [doc for _, doc in k8s_documents()]


# --------------------------------------------------------------------------- Compose


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (.env.example, Slurm's env.example)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = _unquote(value.strip())
    return values


_INTERPOLATION_RE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"${{{name}}} is required: {arg}")
        if op and op.endswith("-"):
            return arg
        return ""

    return _INTERPOLATION_RE.sub(replace, value)


def compose_raw() -> dict:
    return load_yaml_documents(COMPOSE_FILE)[0]


def compose_resolved(env: Mapping[str, str] | None = None) -> dict:
    """The Compose model as `docker compose config` would see it with .env.example as .env."""
    env = read_env_file(COMPOSE_DIR / ".env.example") if env is None else env
    return interpolate(compose_raw(), env)


def compose_service_dockerfile(service: Mapping) -> Path | None:
    build = service.get("build")
    if isinstance(build, Mapping) and "dockerfile" in build:
        context = (COMPOSE_DIR / build.get("context", ".")).resolve()
        return (context / build["dockerfile"]).resolve()
    return image_dockerfile(service.get("image", ""))


def compose_service_argv(service: Mapping) -> list[str]:
    dockerfile = compose_service_dockerfile(service)
    entrypoint, default_cmd = dockerfile_command(dockerfile) if dockerfile else ([], [])
    if "entrypoint" in service:
        entry = service["entrypoint"]
        entrypoint = entry.split() if isinstance(entry, str) else list(entry)
    command = service.get("command", default_cmd)
    command = command.split() if isinstance(command, str) else list(command)
    return entrypoint + command


def compose_explainctl_services() -> dict[str, str]:
    """Services whose entrypoint is explainctl: `docker compose run SERVICE ARGS` runs it."""
    services = {}
    for name, service in compose_raw()["services"].items():
        dockerfile = compose_service_dockerfile(service)
        if dockerfile and "entrypoint" not in service:
            entrypoint, _ = dockerfile_command(dockerfile)
            if entrypoint and Path(entrypoint[-1]).name == "explainctl":
                services[name] = "explainctl"
    return services


def compose_invocations() -> list[Invocation]:
    found = []
    for name, service in compose_raw()["services"].items():
        where = f"{rel(COMPOSE_FILE)} services.{name}"
        main = program_invocation(compose_service_argv(service), where)
        if main:
            found.append(main)
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[:1] in (["CMD"], ["CMD-SHELL"]):
            argv = test[1:] if test[0] == "CMD" else test[1].split()
            probe = program_invocation(argv, f"{where} healthcheck")
            if probe:
                found.append(probe)
    return found


def parse_duration(text: str) -> float:
    """A Compose duration (1h30m, 32m, 90s, 1.5s) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([\d.]+)(h|ms|us|m|s)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(amount) * units[unit] for amount, unit in parts)


# --------------------------------------------------------------------------- everything


def all_invocations() -> list[Invocation]:
    """Every explainctl (and explainctl-probe) invocation anywhere in deploy/."""
    services = compose_explainctl_services()
    found: list[Invocation] = []
    for path in deploy_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".md":
            text = markdown_code(text)
        found.extend(invocations_in_text(text, rel(path), services))
    for path in dockerfiles():
        found.extend(dockerfile_invocations(path))
    found.extend(compose_invocations())
    found.extend(k8s_invocations())
    return found


def variables_in(text: str, prefix: str) -> set[str]:
    return set(re.findall(rf"(?<![A-Za-z0-9_]){prefix}[A-Z0-9_]+", text))


def check_variables(text: str, where: str, known_explainctl: Iterable[str]) -> list[str]:
    """EXPLAINCTL_* names the code does not read, AWS_* names that are not boto3's."""
    known = set(known_explainctl)
    problems = [
        f"{where}: {name} is not a setting of explainctl (explainctl.config)"
        for name in sorted(variables_in(text, "EXPLAINCTL_") - known)
    ]
    problems += [
        f"{where}: {name} is not one of boto3's standard variables"
        for name in sorted(variables_in(text, "AWS_") - STANDARD_AWS_VARIABLES)
    ]
    return problems


def keda_list_names(docs: Iterable[Mapping]) -> list[str]:
    return [
        trigger["metadata"]["listName"]
        for doc in docs
        if doc.get("kind") == "ScaledObject"
        for trigger in doc["spec"]["triggers"]
        if trigger["type"] in ("redis", "redis-cluster", "redis-sentinel")
    ]


def check_keda_queue(docs: Iterable[Mapping], queue: str) -> list[str]:
    """KEDA reads the queue the workers consume and the list of chunk leases, no other."""
    from explainctl.jobs.keys import BUSY_KEY

    names = keda_list_names(docs)
    if not names:
        return ["no ScaledObject with a redis trigger"]
    problems = [f"KEDA listName {name!r} is neither the queue {queue!r} nor {BUSY_KEY!r}"
                for name in names if name not in (queue, BUSY_KEY)]  # fmt: skip
    problems += [f"KEDA reads no list {name!r}" for name in (queue, BUSY_KEY) if name not in names]
    return problems


def check_grace_period(pod: Mapping, env: Mapping[str, str], default_limit: int) -> list[str]:
    limit = int(env.get("EXPLAINCTL_CHUNK_TIME_LIMIT") or default_limit)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= limit:
        return [f"terminationGracePeriodSeconds {grace} <= chunk time limit {limit}"]
    return []
