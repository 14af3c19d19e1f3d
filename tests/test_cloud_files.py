"""The cloud files agree with each other and with the pins: Dockerfile, .dockerignore, cluster.yaml
(AWS, S3, instance profiles) and jobs/rayjob.yaml (GKE, GCS, workload identity). Text and YAML only:
no network, no Docker, no Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
IMAGE_NAME = "ilias-ray"  # <registry>/ilias-ray:<pyproject version>, the name the Dockerfile documents
PROJECT_DIR = "/home/ray/ilias-ray"  # where the image holds this repository
CLOUD_FILES = ["Dockerfile", ".dockerignore", "cluster.yaml", "jobs/rayjob.yaml"]
DATA_FLAGS = ("core", "yfcc", "hdf5_dir", "dataset_dir", "selected_ids", "checkpoint")


def text(name: str) -> str:
    return (ROOT / name).read_text()


def pins() -> dict:
    out = {}
    for line in text("requirements.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return out


def pyproject() -> dict:
    return tomllib.loads(text("pyproject.toml"))["project"]


def cluster() -> dict:
    return yaml.safe_load(text("cluster.yaml"))


def rayjob_docs() -> list:
    return list(yaml.safe_load_all(text("jobs/rayjob.yaml")))


def rayjob() -> dict:
    return next(d for d in rayjob_docs() if d["kind"] == "RayJob")


def pod_specs(job: dict) -> list:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def dockerfile_instructions() -> list:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text("Dockerfile").splitlines() if not line.lstrip().startswith("#"))
    )
    return [tuple((line.strip().split(None, 1) + [""])[:2]) for line in joined.splitlines() if line.strip()]


def image_parts(image: str) -> tuple:
    """'<registry>/ilias-ray:0.1.0' -> ('<registry>', 'ilias-ray', '0.1.0')."""
    path, tag = image.rsplit(":", 1)
    registry, name = path.rsplit("/", 1)
    return registry, name, tag


def data_uris(s: str) -> dict:
    """The paths/URIs given to the data flags in command lines (or in comments showing them)."""
    return {m.group(2): m.group(1) for m in re.finditer(r"--(%s)[ =](\S*/\S*)" % "|".join(DATA_FLAGS), s)}


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_dockerfile_is_the_ray_image_of_the_pinned_ray_and_python():
    froms = [args for ins, args in dockerfile_instructions() if ins.upper() == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", froms[0])
    assert m, froms[0]
    ray_version, py = m.group(1), (int(m.group(2)), int(m.group(3)))
    assert ray_version == pins()["ray"]
    ray_range = next(Requirement(r) for r in pyproject()["dependencies"] if r.startswith("ray["))
    assert ray_range.specifier.contains(ray_version)  # the pins themselves: tests/test_packaging.py
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    # The image's Python satisfies requires-python and is the Python the README says `make` sets up with,
    # the one the pins are tested on.
    lowest = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject()["requires-python"]).groups())
    assert py >= lowest
    documented = re.search(r"with Python (\d+)\.(\d+)", text("README.md"))
    assert documented and py == tuple(int(x) for x in documented.groups()), (froms[0], documented)


def test_dockerfile_installs_the_exact_pins_then_the_project_without_deps():
    steps = dockerfile_instructions()
    runs = [args for ins, args in steps if ins.upper() == "RUN"]
    copies = [args for ins, args in steps if ins.upper() == "COPY"]
    req = [i for i, r in enumerate(runs) if re.search(r"pip install .*-r \S*requirements\.txt", r)]
    proj = [i for i, r in enumerate(runs) if re.search(rf"pip install .*--no-deps \S*{PROJECT_DIR}\b", r)]
    assert req and proj and req[0] < proj[0], runs
    # No other install may loosen or add to the pins.
    for r in runs:
        for cmd in re.findall(r"pip install ([^&;|]*)", r):
            assert "-r " in cmd or "--no-deps" in cmd, cmd
            assert "--upgrade" not in cmd and " -U" not in cmd, cmd
    assert any(c.split()[-1] == PROJECT_DIR and c.split()[-2] == "." for c in copies), copies
    assert any("requirements.txt" in c for c in copies), copies


def test_dockerfile_takes_no_credentials():
    for ins, args in dockerfile_instructions():
        if ins.upper() in ("ARG", "ENV"):
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|AWS_|GOOGLE_", args, re.I), (ins, args)


def test_dockerignore_keeps_local_state_out_of_the_image():
    entries = {line.strip() for line in text(".dockerignore").splitlines() if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "demo_output", "**/__pycache__", "**/.pytest_cache"):
        assert needed in entries, needed
    for kept in ("requirements.txt", "pyproject.toml", "ilias_ray", "jobs"):
        assert kept not in entries, kept


# --- one image, named the same everywhere -------------------------------------------------------------------


def test_cluster_and_rayjob_run_the_project_image_at_the_project_version():
    version = pyproject()["version"]
    images = [cluster()["docker"]["image"]] + [c["image"] for spec in pod_specs(rayjob()) for c in spec["containers"]]
    for image in images:
        registry, name, tag = image_parts(image)
        assert name == IMAGE_NAME and tag == version, image
        assert not registry.startswith("rayproject"), image
    # Both KubeRay pods run the same image; every image named in the Dockerfile's header is one of these.
    assert len(set(images[1:])) == 1
    documented = set(re.findall(r"\S+/%s:\S+" % IMAGE_NAME, text("Dockerfile")))
    assert documented == set(images), (documented, images)
    # The ECR login of cluster.yaml's nodes is for the registry the image lives in.
    registry = image_parts(cluster()["docker"]["image"])[0]
    logins = [c for c in cluster()["initialization_commands"] if "docker login" in c]
    assert logins and all(registry in c for c in logins), logins


def test_rayjob_entrypoint_is_in_the_image():
    entry = rayjob()["spec"]["entrypoint"].split()
    script = entry[entry.index("python") + 1]
    assert script.startswith(PROJECT_DIR + "/")
    assert (ROOT / script[len(PROJECT_DIR) + 1 :]).is_file(), script


# --- cluster.yaml (AWS) --------------------------------------------------------------------------------------


def test_every_node_type_has_an_instance_profile_and_no_keys():
    for name, node_type in cluster()["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and set(profile) == {"Arn"}, name
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+", profile["Arn"]), profile


def test_nodes_install_nothing_when_they_start():
    c = cluster()
    commands = [
        cmd
        for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
        for cmd in c.get(key) or []
    ]
    for node_type in c["available_node_types"].values():
        commands += node_type.get("worker_setup_commands") or []
    for cmd in commands:
        assert not re.search(r"\b(pip|pip3|conda|uv)\b.*\binstall\b", cmd), cmd
        assert "torch" not in cmd, cmd
    # No source tree copied to the nodes: the image has the project, `ray job submit --working-dir` the run's code.
    # The one file mount is Ray's token (see test_every_ray_start_runs_with_token_auth).
    assert set(c.get("file_mounts") or {}) <= {TOKEN_FILE}, c.get("file_mounts")


def test_head_has_no_large_data_disk():
    head = cluster()["available_node_types"][cluster()["head_node_type"]]["node_config"]
    sizes = [m["Ebs"]["VolumeSize"] for m in head.get("BlockDeviceMappings", []) if "Ebs" in m]
    assert all(size <= 300 for size in sizes), sizes
    assert len(head.get("BlockDeviceMappings", [])) <= 1, "only the root volume"


def test_cluster_commands_read_and_write_s3():
    uris = data_uris(text("cluster.yaml"))
    assert {"core", "yfcc", "hdf5_dir"} <= set(uris.values()), uris
    for uri, flag in uris.items():
        assert uri.startswith("s3://"), (flag, uri)


# --- jobs/rayjob.yaml (GKE) --------------------------------------------------------------------------------


def test_rayjob_uses_a_bucket_through_workload_identity():
    docs = rayjob_docs()
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    specs = pod_specs(rayjob())
    names = {spec.get("serviceAccountName") for spec in specs}
    assert len(names) == 1 and names <= set(accounts), (names, set(accounts))
    annotation = accounts[names.pop()]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert re.fullmatch(r"[\w-]+@\S+\.iam\.gserviceaccount\.com", annotation), annotation
    uris = data_uris(rayjob()["spec"]["entrypoint"])
    assert {"core", "yfcc", "hdf5_dir"} <= set(uris.values()), uris
    for uri, flag in uris.items():
        assert uri.startswith("gs://"), (flag, uri)


def walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_rayjob_needs_no_shared_volume():
    keys = {k for doc in rayjob_docs() for k, _ in walk(doc)}
    assert "persistentVolumeClaim" not in keys
    assert "PersistentVolumeClaim" not in {d["kind"] for d in rayjob_docs()}
    assert "/data/" not in rayjob()["spec"]["entrypoint"]


# --- Ray's token authentication stays on --------------------------------------------------------------------

AUTH_FILES = ["cluster.yaml", "jobs/rayjob.yaml", ".ci/run"]
TOKEN_FILE = "~/.ray/auth_token"  # where Ray looks for the token (`ray get-auth-token --generate` writes it)
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName Secret must have
# RAY_AUTH_MODE=disabled, RAY_AUTH_MODE: disabled, {name: RAY_AUTH_MODE, value: disabled}, ${RAY_AUTH_MODE:-disabled}
AUTH_OFF = re.compile(r"RAY_AUTH_MODE[\s\"',:=}{-]*(?:value:\s*)?[\"']?disabled", re.I)


def ray_start_commands(c: dict) -> list:
    """Each `ray start ...` simple command of cluster.yaml's start commands, with what is set before it."""
    cmds = [cmd for key in ("head_start_ray_commands", "worker_start_ray_commands") for cmd in c.get(key) or []]
    cmds += [cmd for t in c["available_node_types"].values() for cmd in t.get("worker_start_ray_commands") or []]
    return [part.strip() for cmd in cmds for part in re.split(r"[;&|\n]+", cmd) if re.search(r"\bray\s+start\b", part)]


@pytest.mark.parametrize("name", AUTH_FILES)
def test_nothing_shipped_turns_token_auth_off(name):
    assert AUTH_OFF.findall(text(name)) == [], name


def test_the_auth_off_check_catches_every_spelling():
    for bad in (
        "RAY_AUTH_MODE=disabled ray start",
        "RAY_AUTH_MODE: disabled",
        "{name: RAY_AUTH_MODE, value: disabled}",
        '- name: RAY_AUTH_MODE\n  value: "disabled"',
        'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"',
    ):
        assert AUTH_OFF.search(bad), bad
    assert not AUTH_OFF.search("RAY_AUTH_MODE=token ray start --head  # disabled only on a laptop")


def test_every_ray_start_runs_with_token_auth():
    c = cluster()
    starts = ray_start_commands(c)
    assert any("--head" in s for s in starts) and any("--address" in s for s in starts), starts
    for start in starts:  # Ray 2.60's `ray start` leaves auth off when the mode is unset and no token exists
        assert re.match(r"(\S+=\S*\s+)*RAY_AUTH_MODE=token\s+(\S+=\S*\s+)*ray\s+start\b", start), start
    # The processes of `ray exec` and of jobs in the containers are token clients too.
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    # Every node gets the token from the launcher's ~/.ray/auth_token (the head from `ray up`, each worker from
    # the head's autoscaler): a path, never a value.
    assert c["file_mounts"] == {TOKEN_FILE: TOKEN_FILE}
    # The `ray job ...` commands the header shows send the token.
    shown = [
        m for line in text("cluster.yaml").splitlines() if (m := re.match(r"#?\s*((?:\S+=\S*\s+)*)ray job \w+", line))
    ]
    assert shown
    for m in shown:
        assert "RAY_AUTH_MODE=token" in m.group(1).split(), m.group(0)


def test_rayjob_runs_with_token_auth_from_a_secret():
    spec = rayjob()["spec"]["rayClusterSpec"]
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token" and auth.get("secretName"), auth  # KubeRay's own containers get it too
    secret = auth["secretName"]
    for pod in pod_specs(rayjob()):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env") or []}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", container["name"]
            token = env.get("RAY_AUTH_TOKEN") or {}
            assert "value" not in token, container["name"]
            assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": secret, "key": TOKEN_SECRET_KEY}
    assert "RAY_AUTH_MODE" not in (rayjob()["spec"].get("runtimeEnvYAML") or "")
    # The Secret is made with kubectl from a generated token; the manifest neither holds nor creates it.
    assert "Secret" not in {d["kind"] for d in rayjob_docs()}
    made = re.search(
        r"kubectl create secret generic (\S+) --from-literal=(\w+)=\"\$\(openssl rand -hex 32\)\"",
        text("jobs/rayjob.yaml"),
    )
    assert made and made.groups() == (secret, TOKEN_SECRET_KEY), made


def test_readme_commands_keep_token_auth():
    """The README's shell blocks never turn token auth off, and each `ray start` or `ray job ...` in them runs
    with RAY_AUTH_MODE=token: on its line, or exported before it in the same section."""
    checked = 0
    for section in re.split(r"(?m)^#{2,3} ", text("README.md")):
        exported = False
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S):
            assert not AUTH_OFF.search(block), block
            for line in block.splitlines():
                exported = exported or bool(re.match(r"\s*export\b.*\bRAY_AUTH_MODE=token\b", line))
                if m := re.match(r"\s*((?:\S+=\S*\s+)*)ray\s+(start|job)\b", line):
                    assert exported or "RAY_AUTH_MODE=token" in m.group(1).split(), line
                    checked += 1
    assert checked >= 5, checked  # the head node's and the cloud's commands


# --- no credentials anywhere ---------------------------------------------------------------------------------

SECRET_PATTERNS = [
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"aws_secret_access_key|aws_access_key_id|aws_session_token",  # credentials-file / env names
    r"\b(secret|access)_key\s*[=:]",  # key=... in URIs, flags, env
    r"\b(s3|gs|gcs)://[^/\s@]*:[^/\s@]*@",  # user:password@ in a bucket URI
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r'"type"\s*:\s*"service_account"|private_key_id',  # a GCP service account key file
    r"GOOGLE_APPLICATION_CREDENTIALS",  # a key file instead of workload identity
    r"(?<!sha256:)\b[0-9a-f]{64}\b",  # a Ray token (`ray get-auth-token`: 64 hex)
    r"RAY_AUTH_TOKEN\s*[=:]\s*(?![\"']?\$)[\"']?\w",  # RAY_AUTH_TOKEN=<a value>, not =$(...)
    r"name:\s*RAY_AUTH_TOKEN\W+value:",  # a Kubernetes env value instead of a Secret
    r"--from-literal=auth_token=(?![\"']?\$)",  # a literal token for the Secret
    r"(?m)^\s*(data|stringData):\s*\{?\s*auth_token\b",  # a Secret manifest carrying the token
]


def secrets_in(s: str) -> list:
    return [m.group(0) for p in SECRET_PATTERNS for m in re.finditer(p, s, re.I)]


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_no_credentials_in_the_cloud_files(name):
    assert secrets_in(text(name)) == [], name


def test_the_credential_check_catches_credentials():
    # The samples are built from pieces so that this file itself holds no credential-shaped text.
    for bad in (
        "AKIA" + "IOSFODNN7EXAMPLE",
        "aws_secret_access_key" + " = x",
        "s3://bucket/p?secret_key=abc",
        "--hdf5_dir s3://me:hunter2@bucket/out",
        "gs://u:p@bucket",
        '{"type": "service_account"}',
        "ENV AWS_SESSION_TOKEN=x",
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "ab12" * 16,
        "RAY_AUTH_TOKEN=" + "s3cr3t",
        "{name: RAY_AUTH_TOKEN, value: x}",
        "--from-literal=auth_token=" + "x",
        "stringData:\n  auth_token: x",
        "data: {auth_token: eA==}",
    ):
        assert secrets_in(bad), bad
    assert not secrets_in("s3://my-features/features/x --hdf5_dir gs://b/p arn:aws:iam::<account>:instance-profile/x")
    assert not secrets_in(
        '--from-literal=auth_token="$(openssl rand -hex 32)" RAY_AUTH_TOKEN=$(cat f) '
        "- name: RAY_AUTH_TOKEN\n  valueFrom: {secretKeyRef: {name: s, key: auth_token}} "
        "FROM rayproject/ray@sha256:" + "ab12" * 16
    )
