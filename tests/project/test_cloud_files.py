"""The cloud files agree with each other and with the pins: Dockerfile, .dockerignore, cluster.yaml
(AWS, S3, instance profiles) and jobs/rayjob.yaml (GKE, GCS, workload identity); their job commands
take only the job's flags, and the GPUs and decode CPUs their comments and docs/cloud.md state are what
their node types give. Text and YAML only: no network, no Docker, no Ray."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from ilias_ray.cli.flags import config_from_args
from ilias_ray.cli.main import build_parser
from ilias_ray.config import Config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


ROOT = Path(__file__).resolve().parents[2]


IMAGE_NAME = "ilias-ray"  # <registry>/ilias-ray:<pyproject version>, the name the Dockerfile documents


PROJECT_DIR = "/home/ray/ilias-ray"  # where the image holds this repository


CLOUD_FILES = ["Dockerfile", ".dockerignore", "cluster.yaml", "jobs/rayjob.yaml"]


DATA_FLAGS = ("core", "yfcc", "hdf5_dir", "dataset_dir", "selected_ids", "checkpoint")


CLOUD_DOC = "docs/cloud.md"  # the cluster recipes (AWS, GKE) and their capacity, moved there from the README


DOCS_WITH_COMMANDS = ("README.md", CLOUD_DOC)  # the shell blocks that start Ray or submit to it


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


def test_dockerfile_is_the_ray_image_of_the_pinned_ray_and_python():
    froms = [args for ins, args in dockerfile_instructions() if ins.upper() == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", froms[0])
    assert m, froms[0]
    ray_version, py = m.group(1), (int(m.group(2)), int(m.group(3)))
    assert ray_version == pins()["ray"]
    ray_range = next(Requirement(r) for r in pyproject()["dependencies"] if r.startswith("ray["))
    assert ray_range.specifier.contains(ray_version)  # the pins themselves: tests/project/test_packaging.py
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


def test_documented_commands_keep_token_auth():
    """The shell blocks of the README and docs/cloud.md never turn token auth off, and each `ray start` or
    `ray job ...` in them runs with RAY_AUTH_MODE=token: on its line, or exported before it in the same section."""
    checked = 0
    for section in (s for name in DOCS_WITH_COMMANDS for s in re.split(r"(?m)^#{2,3} ", text(name))):
        exported = False
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S):
            assert not AUTH_OFF.search(block), block
            for line in block.splitlines():
                exported = exported or bool(re.match(r"\s*export\b.*\bRAY_AUTH_MODE=token\b", line))
                if m := re.match(r"\s*((?:\S+=\S*\s+)*)ray\s+(start|job)\b", line):
                    assert exported or "RAY_AUTH_MODE=token" in m.group(1).split(), line
                    checked += 1
    assert checked >= 5, checked  # the head node's and the cloud's commands


ACTOR_CPUS = 1  # a GPU model actor takes its GPU and 1 CPU; every other CPU of a worker decodes


# The one machine-readable statement of each cluster file's capacity, in its header:
CAPACITY_LINE = re.compile(r"(?m)^#\s*capacity: (\d+) GPUs \(model actors\), (\d+) decode CPUs\s*$")


# ... and docs/cloud.md's ("at most 32 GPUs (model actors) and 352 decode CPUs"):
CAPACITY_PROSE = re.compile(r"(\d+) GPUs \(model actors\)(?:,| and) (\d+) decode CPUs")


# cluster.yaml writes down the vCPUs (and GPUs) it assumes of an instance type beside its resources:
# `resources: {CPU: 4, GPU: 1}   # g5.xlarge: 4 vCPUs, 1 GPU (NVIDIA A10G)`
ASSUMED = re.compile(r"(?m)^\s*resources:\s*\{[^}]*\}\s*#\s*([\w.-]+): (\d+) vCPUs(?:, (\d+) GPUs?\b)?")


def aws_workers(c: dict) -> dict:
    return {name: t for name, t in c["available_node_types"].items() if name != c["head_node_type"]}


def aws_capacity(c: dict) -> tuple:
    """(GPUs, decode CPUs) of cluster.yaml at its largest: each worker type at max_workers."""
    gpus = decode = 0
    for t in aws_workers(c).values():
        res = t["resources"]
        gpus += t["max_workers"] * res.get("GPU", 0)
        decode += t["max_workers"] * (res["CPU"] - ACTOR_CPUS * res.get("GPU", 0))
    return gpus, decode


def quantity(q) -> int:
    """A Kubernetes CPU or GPU quantity ("8", 8, "8000m") as a whole number."""
    q = str(q)
    n = int(q[:-1]) / 1000 if q.endswith("m") else float(q)
    assert n == int(n), q  # Ray counts whole CPUs
    return int(n)


def kuberay_group_resources(group: dict) -> tuple:
    """(CPUs, GPUs) Ray sees on a pod of the group: rayStartParams, else the Ray container's limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]  # KubeRay's Ray container: first
    return quantity(params.get("num-cpus", limits["cpu"])), quantity(
        params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    )


def kuberay_capacity(job: dict) -> tuple:
    """(GPUs, decode CPUs) of jobs/rayjob.yaml at its largest: each worker group at maxReplicas."""
    gpus = decode = 0
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        cpus, group_gpus = kuberay_group_resources(g)
        gpus += g["maxReplicas"] * group_gpus
        decode += g["maxReplicas"] * (cpus - ACTOR_CPUS * group_gpus)
    return gpus, decode


def capacity(name: str) -> tuple:
    return aws_capacity(cluster()) if name == "cluster.yaml" else kuberay_capacity(rayjob())


def joined(lines) -> list:
    """Shell lines with their backslash continuations joined."""
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    return out + ([cur] if cur else [])


def cloud_section(title: str) -> str:
    """docs/cloud.md's `### <title>...` section, up to the next heading of level 2 or 3."""
    found = [s for s in re.split(r"(?m)^#{2,3} ", text(CLOUD_DOC)) if s.startswith(title)]
    assert len(found) == 1, title
    return found[0]


# Where a command starting jobs/extract_model.py on a cloud cluster is shown: the cluster file it runs on.
JOB_COMMANDS = {
    "cluster.yaml": "cluster.yaml",
    "docs/cloud.md, AWS": "cluster.yaml",
    "jobs/rayjob.yaml": "jobs/rayjob.yaml",
}


def job_command(where: str) -> str:
    """The one job command shown in `where` (a header comment, docs/cloud.md's AWS recipe, the RayJob)."""
    if where == "jobs/rayjob.yaml":
        return rayjob()["spec"]["entrypoint"]
    if where == "cluster.yaml":
        lines = [line[1:] for line in text("cluster.yaml").splitlines() if line.startswith("#")]
    else:
        blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", cloud_section("AWS:"), re.S)
        lines = [line for b in blocks for line in b.splitlines()]
    found = [c for c in joined(lines) if "extract_model.py" in c]
    assert len(found) == 1, (where, found)
    return found[0]


def job_flags(command: str) -> dict:
    """{flag: value} of the jobs/extract_model.py part of a command line (every flag there takes a value)."""
    tokens = shlex.split(command, comments=True)
    argv = tokens[next(i for i, t in enumerate(tokens) if t.endswith("jobs/extract_model.py")) + 1 :]
    flags, k = {}, 0
    while k < len(argv):
        assert argv[k].startswith("--"), (argv[k], command)
        if "=" in argv[k]:
            name, value = argv[k][2:].split("=", 1)
            k += 1
        else:
            name, value = argv[k][2:], argv[k + 1]
            k += 2
        assert name not in flags, (name, command)
        flags[name] = value
    return flags


def extract_model_flags() -> set:
    """The flags jobs/extract_model.py declares itself (read from its source: importing it loads torch);
    it passes any other flag to each `ilias-ray extract` it runs."""
    return {
        node.args[0].value[2:]
        for node in ast.walk(ast.parse(text("jobs/extract_model.py")))
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "add_argument"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("--")
    }


@pytest.mark.parametrize("where", JOB_COMMANDS)
def test_job_commands_take_only_flags_the_job_and_ilias_ray_extract_know(where):
    flags = job_flags(job_command(where))
    own = extract_model_flags()
    assert {"core", "hdf5_dir", "model"} <= own, own  # read the script's flags at all
    extract = {f.name for f in Config.flags()}
    assert set(flags) <= own | extract, (where, set(flags) - own - extract)
    # The rest reaches `ilias-ray extract`, whose parser (made from Config) takes them and their values.
    passed = [x for name, value in flags.items() if name not in own for x in (f"--{name}", value)]
    args = build_parser().parse_args(
        ["extract", "--dataset_dir", flags["core"], "--hdf5_dir", flags["hdf5_dir"], *passed]
    )
    cfg = config_from_args(args)
    assert cfg.use_gpu is True, where  # GPU actors (and the request for GPUs) before any GPU node is up
    # Decoding: the default (no cap; N would cap it at N per model actor) is what a growing cluster needs.
    assert "num_workers" not in flags, where
    assert cfg.num_workers == Config.default("num_workers")


@pytest.mark.parametrize("where", JOB_COMMANDS)
def test_model_actors_is_the_gpu_workers_maximum(where):
    """Ray Data asks the autoscaler for up to --model_actors GPUs: more than the cluster can start would never be
    granted, fewer would leave GPU nodes idle."""
    name = JOB_COMMANDS[where]
    gpus, _ = capacity(name)
    assert gpus >= 1, name
    assert int(job_flags(job_command(where))["model_actors"]) == gpus, (where, name, gpus)


def test_the_cloud_doc_shows_the_job_command_of_cluster_yaml():
    assert job_flags(job_command("docs/cloud.md, AWS")) == job_flags(job_command("cluster.yaml"))


@pytest.mark.parametrize("name", ["cluster.yaml", "jobs/rayjob.yaml"])
def test_stated_capacity_is_what_the_node_types_give(name):
    stated = CAPACITY_LINE.findall(text(name))
    assert len(stated) == 1, (name, stated)
    assert tuple(int(x) for x in stated[0]) == capacity(name), (name, stated[0], capacity(name))


@pytest.mark.parametrize("title, name", [("AWS:", "cluster.yaml"), ("GKE:", "jobs/rayjob.yaml")])
def test_the_cloud_doc_states_the_capacity_of_each_cluster_file(title, name):
    stated = {tuple(int(x) for x in m) for m in CAPACITY_PROSE.findall(cloud_section(title))}
    assert stated == {capacity(name)}, (title, name, stated, capacity(name))


def test_capacity_checks_read_their_numbers():
    assert CAPACITY_LINE.findall("# capacity: 32 GPUs (model actors), 352 decode CPUs\n") == [("32", "352")]
    assert CAPACITY_PROSE.findall("at most 16 GPUs (model actors) and 112 decode CPUs.") == [("16", "112")]
    c = {
        "head_node_type": "h",
        "available_node_types": {
            "h": {"resources": {"CPU": 0}},
            "g": {"max_workers": 3, "resources": {"CPU": 8, "GPU": 2}},
            "c": {"max_workers": 2, "resources": {"CPU": 16}},
        },
    }
    assert aws_capacity(c) == (6, 3 * (8 - 2) + 2 * 16)
    group = {"maxReplicas": 4, "rayStartParams": {}, "template": {"spec": {"containers": [{"resources": {}}]}}}
    group["template"]["spec"]["containers"][0]["resources"]["limits"] = {"cpu": "8000m", "nvidia.com/gpu": 1}
    assert kuberay_capacity({"spec": {"rayClusterSpec": {"workerGroupSpecs": [group]}}}) == (4, 28)
    assert job_flags("ray job submit -- python jobs/extract_model.py --a 1 --b=x  # c") == {"a": "1", "b": "x"}


def test_aws_node_types_declare_the_resources_of_their_instance_types():
    """Explicit resources are what the autoscaler plans with and what each worker's `ray start` advertises
    (RAY_OVERRIDE_RESOURCES); the comment beside each says what the instance type has."""
    c = cluster()
    head = c["available_node_types"][c["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver and the sinks only
    assumed = {m.group(1): (int(m.group(2)), int(m.group(3) or 0)) for m in ASSUMED.finditer(text("cluster.yaml"))}
    for name, t in aws_workers(c).items():
        res, itype = t["resources"], t["node_config"]["InstanceType"]
        assert set(res) <= {"CPU", "GPU"} and "CPU" in res, (name, res)
        assert assumed.get(itype) == (res["CPU"], res.get("GPU", 0)), (name, itype, res, assumed)
        assert res["CPU"] > ACTOR_CPUS * res.get("GPU", 0), (name, res)  # room to decode beside the actors
        assert t["min_workers"] == 0, name
    assert any(t["resources"].get("GPU") for t in aws_workers(c).values())
    # The cluster's own cap lets every worker type reach its maximum, so the capacity is reachable.
    assert sum(t["max_workers"] for t in aws_workers(c).values()) <= c["max_workers"]


def test_kuberay_groups_give_ray_what_their_pods_get():
    spec = rayjob()["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True  # what Ray Data's resource requests talk to
    assert str(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) == "0"  # the driver and the sinks only
    for g in spec["workerGroupSpecs"]:
        container = g["template"]["spec"]["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for key in ("cpu", "nvidia.com/gpu"):  # the pod is given what Ray counts
            assert quantity(requests.get(key, 0)) == quantity(limits.get(key, 0)), (g["groupName"], key)
        cpus, gpus = kuberay_group_resources(g)
        assert cpus > ACTOR_CPUS * gpus, g["groupName"]
        assert g.get("minReplicas", 0) == 0 and g["maxReplicas"] >= 1, g["groupName"]


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


def test_shipped_files_keep_servers_local_and_hold_no_credentials():
    shipped = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt", ".cfg")
        and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
        and "demo_output" not in p.parts
    ]
    text = {p: p.read_text(errors="replace") for p in shipped}
    secrets = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S+|BEGIN [A-Z ]*PRIVATE KEY|"
        r"(?i:password|api[_-]?key|secret)\s*[:=]\s*['\"][^'\"]{6,}['\"]|hf_[A-Za-z0-9]{30,}"
    )
    for p, t in text.items():
        assert not secrets.search(t), f"{p} looks like it holds a credential"
        if p.suffix in (".yaml", ".yml", ".md", ".sh"):
            for m in re.finditer(r"ray start --head", t):
                command = t[m.start() : m.start() + 300].split("ray start", 2)[1]  # up to the next command
                assert re.search(r"--dashboard-host[= ]127\.0\.0\.1", command), f"{p}: {command}"
            assert not re.search(r"dashboard-host[=: \"']+0\.0\.0\.0", t), p
    assert "include_dashboard=False" in (ROOT / "ilias_ray" / "job" / "session.py").read_text()
