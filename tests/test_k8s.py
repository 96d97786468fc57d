"""The KubeRay manifests in k8s/, checked offline.

Each RayCluster / RayJob is validated against the v1 OpenAPI schema of KubeRay's CRD (from
../shared/kuberay-crds/, beside the checkout) with jsonschema, plus what no schema holds: fields the
schema does not know (the API server would silently prune them), GPU limits on GPU workers,
minReplicas <= replicas <= maxReplicas, a GPU-free head, the shared storage mounted at one path
everywhere, and a RayJob entrypoint that names a script and a config that exist and load.
"""

import functools
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from rayft.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
GPU = "nvidia.com/gpu"
STORAGE_PATH = "/mnt/rayft"  # rayft's storage root in every pod

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (../shared beside the checkout)"
)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def load_manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _path(parts) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


def _unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Keys the schema does not declare (kubectl --validate=strict rejects them; jsonschema cannot,
    since CRD schemas leave additionalProperties open and rely on pruning)."""
    errors = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                errors += _unknown_fields(sub, props[key], f"{where}.{key}".lstrip("."))
            elif isinstance(extra, dict):
                errors += _unknown_fields(sub, extra, f"{where}.{key}".lstrip("."))
            elif props and not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
                errors.append(f"{where}.{key}: unknown field".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += _unknown_fields(item, schema["items"], f"{where}[{i}]")
    return errors


def _storage_mounts(pod_spec: dict) -> dict:
    """{claimName: mountPath} of the PVC mounts of the pod's Ray container (containers[0])."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
    ray = pod_spec["containers"][0]
    return {claims[m["name"]]: m["mountPath"] for m in ray.get("volumeMounts", []) if m["name"] in claims}


def _check_cluster(spec: dict, where: str) -> list[str]:
    errors = []
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling: must be true (the GPU group autoscales)")
    if spec.get("authOptions", {}).get("mode") != "token":
        errors.append(f"{where}.authOptions.mode: must be token (without it anyone who reaches the head runs code)")
    head = spec.get("headGroupSpec", {})
    params = head.get("rayStartParams", {})
    if params.get("num-cpus") != "0":
        errors.append(f'{where}.headGroupSpec.rayStartParams.num-cpus: must be "0" (no training on the head)')
    if params.get("dashboard-host") != "0.0.0.0":
        errors.append(f'{where}.headGroupSpec.rayStartParams.dashboard-host: must be "0.0.0.0"')
    if params.get("num-gpus", "0") != "0":
        errors.append(f"{where}.headGroupSpec.rayStartParams.num-gpus: the head must have no GPU")
    head_pod = head.get("template", {}).get("spec", {})
    for i, c in enumerate(head_pod.get("containers", [])):
        for kind in ("limits", "requests"):
            if GPU in c.get("resources", {}).get(kind, {}):
                errors.append(f"{where}.headGroupSpec.template.spec.containers[{i}].resources.{kind}: the head must have no {GPU}")
    if not head_pod.get("containers"):
        return errors + [f"{where}.headGroupSpec.template.spec.containers: missing"]
    head_mounts = _storage_mounts(head_pod)
    if head_mounts.get("rayft-storage") != STORAGE_PATH:
        errors.append(f"{where}.headGroupSpec: the rayft-storage claim must be mounted at {STORAGE_PATH}")
    image = head_pod["containers"][0].get("image")

    groups = spec.get("workerGroupSpecs", [])
    gpu_groups = 0
    for i, g in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        n = g.get("replicas", lo)
        if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(n, int)):
            errors.append(f"{at}: replica counts must be integers")
        elif not lo <= n <= hi:
            errors.append(f"{at}: need minReplicas <= replicas <= maxReplicas, got {lo} <= {n} <= {hi}")
        pod = g.get("template", {}).get("spec", {})
        containers = pod.get("containers", [])
        if not containers:
            errors.append(f"{at}.template.spec.containers: missing")
            continue
        ray = containers[0]
        res = ray.get("resources", {})
        # A GPU group by name, by toleration, by rayStartParams or by any GPU ask at all: so a group
        # that lost its limit is still recognised as one.
        is_gpu = ("gpu" in str(g.get("groupName", "")).lower() or "num-gpus" in g.get("rayStartParams", {})
                  or any(t.get("key") == GPU for t in pod.get("tolerations", []))
                  or any(GPU in c.get("resources", {}).get(k, {}) for c in containers for k in ("limits", "requests")))
        if is_gpu:
            gpu_groups += 1
            limit = res.get("limits", {}).get(GPU)
            if not (isinstance(limit, int) or str(limit).isdigit()) or int(limit) < 1:
                errors.append(f"{at}.template.spec.containers[0].resources.limits: needs {GPU} >= 1, got {limit!r}")
            elif GPU in res.get("requests", {}) and str(res["requests"][GPU]) != str(limit):
                errors.append(f"{at}.template.spec.containers[0].resources: {GPU} requests must equal limits")
        if _storage_mounts(pod) != head_mounts:
            errors.append(f"{at}: storage mounts {_storage_mounts(pod)} differ from the head's {head_mounts}")
        if ray.get("image") != image:
            errors.append(f"{at}: image {ray.get('image')} differs from the head's {image} (Ray versions must match)")
    if gpu_groups == 0:
        errors.append(f"{where}.workerGroupSpecs: no GPU worker group")
    return errors


def _check_entrypoint(entrypoint: str, where: str) -> list[str]:
    args = shlex.split(entrypoint or "")
    if len(args) < 3 or not args[0].startswith("python") or not args[1].endswith(".py"):
        return [f"{where}: expected `python SCRIPT.py CONFIG --storage DIR`, got {entrypoint!r}"]
    errors = []
    if not (REPO / args[1]).is_file():
        errors.append(f"{where}: script {args[1]} not in the repository")
    try:
        load_config(REPO / args[2])
    except ConfigError as e:
        errors.append(f"{where}: config {args[2]}: {e}")
    storage = args[args.index("--storage") + 1] if "--storage" in args[:-1] else None
    if storage is None or not storage.startswith(STORAGE_PATH + "/"):
        errors.append(f"{where}: --storage must be a directory under {STORAGE_PATH}, got {storage!r}")
    return errors


def _check_serve_config(text, where: str) -> list[str]:
    """serveConfigV2: rayft's application, importable from the image, its args a valid ServeConfig
    with the store on the shared claim, one GPU per replica, autoscaling bounds."""
    from rayft.config import ServeConfig

    try:
        cfg = yaml.safe_load(text or "")
    except yaml.YAMLError as e:
        return [f"{where}: not valid YAML: {e}"]
    apps = (cfg or {}).get("applications") if isinstance(cfg, dict) else None
    if not apps:
        return [f"{where}: no applications"]
    app, errors = apps[0], []
    module, _, attr = str(app.get("import_path", "")).partition(":")
    script = REPO / (module.replace(".", "/") + ".py")
    if not script.is_file() or f"def {attr}(" not in script.read_text():
        errors.append(f"{where}: import_path {app.get('import_path')!r} is not a builder in the repository")
    try:
        args = ServeConfig.model_validate(app.get("args") or {})
        if not str(args.store).startswith(STORAGE_PATH + "/"):
            errors.append(f"{where}: args.store must be under {STORAGE_PATH}, got {str(args.store)!r}")
    except ValueError as e:
        errors.append(f"{where}: args: {e}")
    dep = (app.get("deployments") or [{}])[0]
    if (dep.get("ray_actor_options") or {}).get("num_gpus") != 1:
        errors.append(f"{where}: deployments.0.ray_actor_options.num_gpus: one GPU per replica")
    auto = dep.get("autoscaling_config") or {}
    if not (1 <= auto.get("min_replicas", 0) <= auto.get("max_replicas", 0)):
        errors.append(f"{where}: deployments.0.autoscaling_config: needs 1 <= min_replicas <= max_replicas")
    return errors


def check_manifest(doc: dict) -> list[str]:
    """Every problem found in a RayCluster / RayJob / RayService manifest, as readable lines (empty: fine)."""
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: expected one of {sorted(CRD_FILES)}, got {kind!r}"]
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}"]
    schema = crd_schema(kind)
    # jsonschema ignores the x-kubernetes-* and OpenAPI-only keys it does not know.
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    errors += _unknown_fields(doc, schema)
    if not doc.get("metadata", {}).get("name"):
        errors.append("metadata.name: missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: missing"]
    if kind == "RayCluster":
        errors += _check_cluster(spec, "spec")
    elif kind == "RayService":
        if "rayClusterConfig" not in spec:
            errors.append("spec.rayClusterConfig: missing")
        else:
            errors += _check_cluster(spec["rayClusterConfig"], "spec.rayClusterConfig")
        errors += _check_serve_config(spec.get("serveConfigV2"), "spec.serveConfigV2")
    else:
        errors += _check_entrypoint(spec.get("entrypoint"), "spec.entrypoint")
        if "rayClusterSpec" in spec:
            errors += _check_cluster(spec["rayClusterSpec"], "spec.rayClusterSpec")
            if spec.get("shutdownAfterJobFinishes") is not True:
                errors.append("spec.shutdownAfterJobFinishes: must be true with a rayClusterSpec (free the GPUs)")
        elif not spec.get("clusterSelector"):
            errors.append("spec: needs rayClusterSpec or clusterSelector")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            if not isinstance(env, dict):
                errors.append("spec.runtimeEnvYAML: must be a YAML mapping")
        except yaml.YAMLError as e:
            errors.append(f"spec.runtimeEnvYAML: not valid YAML: {e}")
    return errors


# --- the manifests as written -----------------------------------------------------------------


@needs_crds
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_manifest_is_valid(name):
    assert check_manifest(load_manifest(name)) == []


def test_storage_claim_is_read_write_many():
    pvc = load_manifest("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "rayft-storage"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        assert "claimName: rayft-storage" in (K8S / name).read_text()


@pytest.mark.parametrize("name, key", [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")])
def test_own_clusters_match_raycluster(name, key):
    """The RayJob's and the RayService's own clusters have the RayCluster's shape: same images,
    storage, head params."""
    cluster = load_manifest("raycluster.yaml")["spec"]
    job_cluster = load_manifest(name)["spec"][key]

    def shape(spec):
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        return (spec["rayVersion"], spec["headGroupSpec"]["rayStartParams"],
                [p["containers"][0]["image"] for p in pods], [_storage_mounts(p) for p in pods],
                [(g["groupName"], g["template"]["spec"]["containers"][0]["resources"]["limits"])
                 for g in spec["workerGroupSpecs"]])

    assert shape(job_cluster) == shape(cluster)


# --- a broken manifest must fail ---------------------------------------------------------------


def _ray_worker(spec):
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _del_gpu_limit(d):
    for kind in ("limits", "requests"):
        del _ray_worker(d["spec"])["resources"][kind][GPU]


def _mount_elsewhere(d):
    _ray_worker(d["spec"])["volumeMounts"][0]["mountPath"] = "/data"


def _set(path, value):
    def mutate(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        d[last] = value
    return mutate


def _delete(path):
    def mutate(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        del d[last]
    return mutate


def _misspell(path, old, new):
    def mutate(d):
        for key in path:
            d = d[key]
        d[new] = d.pop(old)
    return mutate


WG = ("spec", "workerGroupSpecs", 0)
HEAD_RES = ("spec", "headGroupSpec", "template", "spec", "containers", 0, "resources")
CLUSTER_MUTATIONS = {
    "gpu limit deleted": (_del_gpu_limit, GPU),
    "gpu limit zero": (lambda d: _ray_worker(d["spec"])["resources"]["limits"].update({GPU: 0}), GPU),
    "maxReplicas < minReplicas": (_set(WG + ("maxReplicas",), -1), "minReplicas <= replicas <= maxReplicas"),
    "replicas > maxReplicas": (_set(WG + ("replicas",), 9), "minReplicas <= replicas <= maxReplicas"),
    "maxReplicas wrong type": (_set(WG + ("maxReplicas",), "four"), "is not of type 'integer'"),
    "misspelled spec field": (_misspell(("spec",), "workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec: unknown field"),
    "misspelled container field": (_misspell(WG[:3] + ("template", "spec", "containers", 0), "volumeMounts", "volumeMount"),
                                   "volumeMount: unknown field"),
    "required groupName missing": (_delete(WG + ("groupName",)), "'groupName' is a required property"),
    "head has a gpu": (_set(HEAD_RES + ("limits", GPU), 1), "the head must have no"),
    "head asks Ray for a gpu": (_set(("spec", "headGroupSpec", "rayStartParams", "num-gpus"), "1"), "the head must have no GPU"),
    "head takes training": (_set(("spec", "headGroupSpec", "rayStartParams", "num-cpus"), "8"), "num-cpus"),
    "rayStartParams not strings": (_set(("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0), "is not of type 'string'"),
    "worker mounts storage elsewhere": (_mount_elsewhere, "storage mounts"),
    "no autoscaling": (_set(("spec", "enableInTreeAutoscaling"), False), "enableInTreeAutoscaling"),
    "no token authentication": (_delete(("spec", "authOptions")), "authOptions.mode: must be token"),
    "unknown auth mode": (_set(("spec", "authOptions", "mode"), "password"), "is not one of"),
}


def _entrypoint(old, new):
    def mutate(d):
        d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace(old, new)
    return mutate


JOB_MUTATIONS = {
    "script missing": (_entrypoint("jobs/train.py", "jobs/trian.py"), "not in the repository"),
    "config missing": (_entrypoint("configs/tinyllama.yaml", "configs/nope.yaml"), "config file not found"),
    "config invalid": (_entrypoint("configs/tinyllama.yaml", "k8s/rayjob.yaml"), "config k8s/rayjob.yaml"),
    "output off the shared storage": (_entrypoint("/mnt/rayft/", "/tmp/"), "--storage"),
    "no shutdown": (_delete(("spec", "shutdownAfterJobFinishes")), "shutdownAfterJobFinishes"),
    "misspelled job field": (_misspell(("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
                             "shutdownAfterJobFinished: unknown field"),
    "cluster gpu limit deleted": (lambda d: _del_gpu_limit({"spec": d["spec"]["rayClusterSpec"]}), GPU),
    "wrong apiVersion": (_set(("apiVersion",), "ray.io/v1alpha1"), "apiVersion"),
}


def _serve_config(edit):
    def mutate(d):
        cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
        edit(cfg["applications"][0])
        d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    return mutate


SERVICE_MUTATIONS = {
    "import path wrong": (_serve_config(lambda a: a.update(import_path="serve.nope:app")), "is not a builder"),
    "store off the claim": (_serve_config(lambda a: a["args"].update(store="/tmp/x")), "args.store must be under"),
    "unknown arg": (_serve_config(lambda a: a["args"].update(max_adaptors=3)), "max_adaptors"),
    "no GPU": (_serve_config(lambda a: a["deployments"][0]["ray_actor_options"].update(num_gpus=0)), "one GPU per replica"),
    "no cluster": (lambda d: d["spec"].pop("rayClusterConfig"), "spec.rayClusterConfig: missing"),
}

MUTATIONS = [("raycluster.yaml", c, *CLUSTER_MUTATIONS[c]) for c in sorted(CLUSTER_MUTATIONS)] + [
    ("rayjob.yaml", c, *JOB_MUTATIONS[c]) for c in sorted(JOB_MUTATIONS)] + [
    ("rayservice.yaml", c, *SERVICE_MUTATIONS[c]) for c in sorted(SERVICE_MUTATIONS)]


@needs_crds
@pytest.mark.parametrize("manifest, case, mutate, expected", MUTATIONS, ids=[f"{m}-{c}" for m, c, *_ in MUTATIONS])
def test_broken_manifest_is_reported(manifest, case, mutate, expected):
    doc = load_manifest(manifest)
    mutate(doc)
    errors = check_manifest(doc)
    assert any(expected in e for e in errors), errors

