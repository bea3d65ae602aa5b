#!/usr/bin/env python3
"""Checks the deployment files under docker/ without a cluster or a Docker engine.

  .venv/bin/python docker/check-manifests.py      (scripts/test runs it)

- Kubernetes: renders docker/k8s (the base kustomization) and docker/k8s/gpu (the overlay:
  its `images` and strategic-merge patch, for the subset of kustomize they use) and validates
  every object, strictly (unknown fields rejected), against the Kubernetes JSON schemas
  bundled by kubernetes-validate, for the oldest and newest versions in CHECK_VERSIONS. The
  ServiceMonitor is a CRD with no schema there: it is parsed and its fields checked.
- Then what schemas cannot see: the cross-references that decide whether the thing works
  (probe paths, the port a probe, Service, annotation or ServiceMonitor names, the grace
  period against preStop + drain, HPA and PDB targets, labels and selectors, the uid the
  image runs as).
- compose.yaml, nginx/detectd.conf, prometheus/prometheus.yml, the Grafana provisioning and
  dashboard, the Dockerfile and .dockerignore: parsed, and checked against each other.

Installs kubernetes-validate into the running interpreter's environment (the project venv)
when it is missing. Prints one line per failed check and exits 1 if any failed.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
# The oldest Kubernetes release these manifests are meant for, and the newest schema bundled.
CHECK_VERSIONS = ["1.30.0", "1.37.0"]

DOCKER = Path(__file__).resolve().parent
K8S = DOCKER / "k8s"
ROOT = DOCKER.parent

try:
    import yaml
    import kubernetes_validate
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", KUBERNETES_VALIDATE])
    import yaml
    import kubernetes_validate

failures = []
checks = 0


def check(ok, what):
    global checks
    checks += 1
    if not ok:
        failures.append(what)
    return ok


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --- rendering, for the subset of kustomize these files use ---------------------------------

def merge(base, patch):
    """Strategic merge as Kubernetes does it for the fields the GPU patch touches: maps merge,
    lists of named items (containers, env, volumes) merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    named = lambda l: isinstance(l, list) and l and all(isinstance(i, dict) and "name" in i for i in l)
    if named(base) and named(patch):
        out = [copy.deepcopy(i) for i in base]
        index = {i["name"]: n for n, i in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def set_images(doc, images):
    for c in pod_spec(doc).get("containers", []) + pod_spec(doc).get("initContainers", []):
        name, _, _ = c["image"].partition(":")
        for img in images:
            if img["name"] == name:
                c["image"] = f'{img.get("newName", name)}:{img["newTag"]}'


def render(folder):
    """The objects `kubectl apply -k folder` would create."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "images", "patches"}
    check(set(kust) <= known, f"{folder}/kustomization.yaml: fields this checker cannot render: {set(kust) - known}")
    docs = []
    for res in kust.get("resources", []):
        path = (folder / res).resolve()
        docs += render(path) if path.is_dir() else load_all(path)
    for p in kust.get("patches", []):
        patch = yaml.safe_load((folder / p["path"]).read_text())
        targets = [d for d in docs if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]]
        check(len(targets) == 1, f"{folder}: patch {p['path']} matches {len(targets)} objects")
        for t in targets:
            docs[docs.index(t)] = merge(t, patch)
    if "images" in kust:
        for d in docs:
            if d["kind"] == "Deployment":
                set_images(d, kust["images"])
    return docs


# --- helpers --------------------------------------------------------------------------------

def pod_spec(dep):
    return dep["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    check(len(found) == 1, f"expected one {kind}, found {len(found)}")
    return found[0] if found else None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dockerfile_uid():
    users = re.findall(r"^USER\s+(\d+)", (DOCKER / "Dockerfile").read_text(), re.M)
    return {int(u) for u in users}


# --- Kubernetes ------------------------------------------------------------------------------

def check_k8s(name, docs, gpu):
    where = f"k8s {name}"
    for d in docs:
        for version in CHECK_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
                check(True, "")
            except kubernetes_validate.ValidationError as e:
                check(False, f"{where}: {d['kind']}/{d['metadata']['name']} invalid for Kubernetes {version}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}")
    dep, svc, hpa, pdb = (one(docs, k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"))
    if not all((dep, svc, hpa, pdb)):
        return
    spec = pod_spec(dep)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(selects(dep["spec"]["selector"]["matchLabels"], labels), f"{where}: Deployment selector does not match its pod labels")
    check("replicas" not in dep["spec"], f"{where}: Deployment sets replicas, which fights the HPA")
    main = [c for c in spec["containers"] if c["name"] == "detectd"]
    if not check(len(main) == 1, f"{where}: no container named detectd"):
        return
    c = main[0]
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("http") == 8080, f"{where}: container port `http` is not 8080: {ports}")
    check(env.get("DETECTD_LISTEN", "").endswith(":8080"), f"{where}: DETECTD_LISTEN {env.get('DETECTD_LISTEN')} is not the container port 8080")

    def port_of(p):
        return ports.get(p) if isinstance(p, str) else p

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/readyz")):
        pr = c.get(probe)
        if check(pr and "httpGet" in pr, f"{where}: {probe} missing or not an HTTP probe"):
            check(pr["httpGet"]["path"] == path, f"{where}: {probe} path {pr['httpGet']['path']}, want {path}")
            check(port_of(pr["httpGet"]["port"]) == 8080, f"{where}: {probe} port {pr['httpGet']['port']} is not the container port")
    sp = c.get("startupProbe", {})
    check(sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 120,
          f"{where}: startupProbe allows under 2 minutes for loading the models")
    # Grace period: the kubelet's countdown covers preStop and the drain together.
    cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else None
    drain = int(env.get("DETECTD_SHUTDOWN_TIMEOUT_S") or 30)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if check(pre is not None, f"{where}: preStop is not `sleep N`: {cmd}"):
        check(grace > pre + drain, f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre} + drain {drain}")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            check(r in res.get(kind, {}), f"{where}: resources.{kind}.{r} missing")
    quantity = re.compile(r"\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
    for kind in ("requests", "limits"):
        for r, q in res.get(kind, {}).items():
            check(quantity.fullmatch(str(q)) is not None, f"{where}: resources.{kind}.{r} {q!r} is not a quantity")
    cpu = str(res.get("limits", {}).get("cpu", ""))
    check(cpu.isdigit() and env.get("DETECTD_THREADS") == cpu, f"{where}: DETECTD_THREADS {env.get('DETECTD_THREADS')} != CPU limit {cpu}")
    # Security: the image's numeric user.
    sc = spec.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot not set")
    check(sc.get("runAsUser") in dockerfile_uid(), f"{where}: runAsUser {sc.get('runAsUser')} is not the Dockerfile's USER {dockerfile_uid()}")
    # Weights: every container mounts the volume at DETECTD_CACHE_DIR; the init container fetches.
    vols = {v["name"] for v in spec.get("volumes", [])}
    for cont in spec["containers"] + spec.get("initContainers", []):
        for m in cont.get("volumeMounts", []):
            check(m["name"] in vols, f"{where}: {cont['name']} mounts unknown volume {m['name']}")
        mounts = {m["mountPath"] for m in cont.get("volumeMounts", [])}
        check(env_of(cont).get("DETECTD_CACHE_DIR") in mounts, f"{where}: {cont['name']}: DETECTD_CACHE_DIR is not a mounted volume")
    init = spec.get("initContainers", [])
    if check(len(init) == 1, f"{where}: expected one init container (weights fetch)"):
        check(init[0]["args"][:2] == ["weights", "fetch"], f"{where}: init container does not run `weights fetch`")
        check(set(init[0]["args"][2:]) == {env.get("DETECTD_DETECTOR_WEIGHTS"), env.get("DETECTD_CLASSIFIER_WEIGHTS")},
              f"{where}: init container fetches {init[0]['args'][2:]}, the server loads "
              f"{env.get('DETECTD_DETECTOR_WEIGHTS')}, {env.get('DETECTD_CLASSIFIER_WEIGHTS')}")
        check(init[0]["image"] == c["image"], f"{where}: init container image {init[0]['image']} != {c['image']}")
    # Prometheus annotations point at the metrics port and path.
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true", f"{where}: prometheus.io/scrape not \"true\"")
    check(ann.get("prometheus.io/port") == "8080", f"{where}: prometheus.io/port {ann.get('prometheus.io/port')} != 8080")
    check(ann.get("prometheus.io/path") == "/metrics", f"{where}: prometheus.io/path {ann.get('prometheus.io/path')}")
    # Service -> pods.
    check(selects(svc["spec"]["selector"], labels), f"{where}: Service selector does not match the pod labels")
    # Each Service port reaches the container port of its name, and the server listens there.
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listens = {"http": env.get("DETECTD_LISTEN", ""), "grpc": env.get("DETECTD_GRPC_ADDR", "")}
    for p in svc["spec"]["ports"]:
        name = p["targetPort"]
        check(name in container_ports, f"{where}: Service targetPort {name} is not a container port")
        check(listens.get(name, "").endswith(f":{container_ports.get(name)}"),
              f"{where}: the server does not listen on container port {name}")
    # HPA -> Deployment; PDB -> pods, and leaves one pod up at the HPA's minimum.
    ref = hpa["spec"]["scaleTargetRef"]
    check((ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"]),
          f"{where}: HPA targets {ref}, not the Deployment")
    check(hpa["spec"].get("minReplicas", 1) >= 2, f"{where}: HPA minReplicas below 2")
    check(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]),
          f"{where}: HPA has no CPU metric")
    check(selects(pdb["spec"]["selector"]["matchLabels"], labels), f"{where}: PDB selector does not match the pod labels")
    check(hpa["spec"]["minReplicas"] - pdb["spec"].get("maxUnavailable", 0) >= 1,
          f"{where}: PDB may evict every pod at the HPA minimum")
    # The variants.
    lim = res.get("limits", {})
    images = {x["image"] for x in spec["containers"] + init}
    if gpu:
        check(str(lim.get("nvidia.com/gpu")) == "1", f"{where}: no nvidia.com/gpu limit")
        check(env.get("DETECTD_DEVICE") == "cuda", f"{where}: DETECTD_DEVICE {env.get('DETECTD_DEVICE')}, want cuda")
        check(env.get("DETECTD_PRECISION") == "fp16", f"{where}: DETECTD_PRECISION {env.get('DETECTD_PRECISION')}, want fp16")
        check(images == {"detectd:cuda"}, f"{where}: images {images}, want detectd:cuda")
        check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{where}: no GPU toleration")
    else:
        check("nvidia.com/gpu" not in lim, f"{where}: CPU variant asks for a GPU")
        check(env.get("DETECTD_DEVICE") == "cpu", f"{where}: DETECTD_DEVICE {env.get('DETECTD_DEVICE')}, want cpu")
        check(images == {"detectd:cpu"}, f"{where}: images {images}, want detectd:cpu")
    return svc


def check_servicemonitor(svc):
    docs = load_all(K8S / "servicemonitor.yaml")
    if not check(len(docs) == 1, "servicemonitor.yaml: expected one object"):
        return
    sm = docs[0]
    check(sm.get("apiVersion") == "monitoring.coreos.com/v1" and sm.get("kind") == "ServiceMonitor",
          "servicemonitor.yaml: not a monitoring.coreos.com/v1 ServiceMonitor")
    check(selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
          "servicemonitor.yaml: selector does not match the Service's labels")
    names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        check(ep.get("port") in names, f"servicemonitor.yaml: endpoint port {ep.get('port')} is not a Service port {names}")
        check(ep.get("path", "/metrics") == "/metrics", f"servicemonitor.yaml: path {ep.get('path')}")


# --- compose and what it mounts --------------------------------------------------------------

def nginx_upstream_servers(conf):
    block = re.search(r"upstream\s+detectd\s*\{(.*?)\}", conf, re.S)
    if not check(block is not None, "nginx/detectd.conf: no `upstream detectd` block"):
        return []
    return re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M)


def seconds(v):
    m = re.fullmatch(r"(\d+)(s|m)?", str(v))
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1) if m else None


def check_compose():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(s for s in services if re.fullmatch(r"detectd-\d+", s))
    check(len(replicas) >= 3, f"compose: {len(replicas)} detectd replicas, want 3")
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (DOCKER / "Dockerfile").read_text(), re.M | re.I))
    for name in replicas:
        s = services[name]
        env = s["environment"]
        hc = " ".join(s["healthcheck"]["test"])
        check("healthcheck --ready" in hc, f"compose {name}: healthcheck does not probe /readyz (detectd healthcheck --ready)")
        check(seconds(s.get("stop_grace_period", "10s")) > int(env["DETECTD_SHUTDOWN_TIMEOUT_S"]),
              f"compose {name}: stop_grace_period not longer than DETECTD_SHUTDOWN_TIMEOUT_S")
        check(any(str(v).startswith("weights:") for v in s["volumes"]), f"compose {name}: weights volume not mounted")
        check(s["depends_on"]["weights"]["condition"] == "service_completed_successfully",
              f"compose {name}: does not wait for the weights fetch")
        target = re.sub(r"\$\{DETECTD_TARGET:-(\w+)\}", r"\1", s["build"]["target"])
        check(target in stages and "cuda" in stages, f"compose {name}: build target {target} / cuda not in Dockerfile stages {stages}")
        check(s["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / s["build"]["context"] / "Cargo.toml").exists(),
              f"compose {name}: build context is not the repository root")
    w = services.get("weights", {})
    check(w.get("command", [])[:2] == ["weights", "fetch"], "compose: no `weights fetch` service")
    # nginx: its upstream is exactly the replicas, on the port they listen on; retries on.
    lb = services["lb"]
    mount = [v for v in lb["volumes"] if v.startswith("./nginx/detectd.conf:")]
    check(len(mount) == 1 and mount[0].split(":")[1] == "/etc/nginx/conf.d/default.conf",
          "compose lb: nginx/detectd.conf not mounted as conf.d/default.conf")
    conf = re.sub(r"#.*", "", (DOCKER / "nginx" / "detectd.conf").read_text())
    servers = nginx_upstream_servers(conf)
    check(sorted(servers) == [f"{r}:8080" for r in replicas], f"nginx: upstream servers {servers} != replicas {replicas} on :8080")
    nu = re.search(r"proxy_next_upstream\s+([^;]+);", conf)
    if check(nu is not None, "nginx: no proxy_next_upstream"):
        check({"error", "timeout", "http_503", "non_idempotent"} <= set(nu.group(1).split()),
              f"nginx: proxy_next_upstream {nu.group(1)} misses error/timeout/http_503/non_idempotent")
    check(re.search(r"max_fails=\d+", conf) is not None, "nginx: no passive health check (max_fails)")
    check(re.search(r"^\s*listen\s+8080;", conf, re.M) is not None, "nginx: does not listen on 8080")
    check(any(str(p).endswith(":8080") for p in lb["ports"]), "compose lb: port 8080 not published")
    # Prometheus scrapes every replica directly.
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    if check("detectd" in jobs, "prometheus.yml: no detectd job"):
        targets = [t for sc in jobs["detectd"]["static_configs"] for t in sc["targets"]]
        check(sorted(targets) == [f"{r}:8080" for r in replicas], f"prometheus.yml: targets {targets} != replicas")
        check(jobs["detectd"].get("metrics_path", "/metrics") == "/metrics", "prometheus.yml: metrics_path")
    pm = services["prometheus"]["volumes"]
    check("./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in pm, "compose prometheus: config not mounted")
    # Grafana: the provisioned data source is the one the dashboard's panels name.
    gv = services["grafana"]["volumes"]
    check("./grafana/provisioning:/etc/grafana/provisioning:ro" in gv, "compose grafana: provisioning not mounted")
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    check(ds["url"] == "http://prometheus:9090" and "prometheus" in services, "grafana: data source URL is not the compose prometheus")
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/detectd.yaml").read_text())["providers"][0]
    dash_mount = [v for v in gv if v.startswith("./grafana/dashboards:")]
    check(len(dash_mount) == 1 and dash_mount[0].split(":")[1] == prov["options"]["path"],
          "grafana: dashboards folder not mounted where the provider reads")
    dash = json.loads((DOCKER / "grafana/dashboards/detectd.json").read_text())
    exprs = []
    for p in dash["panels"]:
        check(p["datasource"]["uid"] == ds["uid"], f"dashboard panel {p['title']}: data source {p['datasource']}")
        for t in p["targets"]:
            exprs.append(t["expr"])
    used = set(re.findall(r"detectd_[a-z_]+", " ".join(exprs)))
    for series in ("detectd_requests_total", "detectd_request_duration_seconds_bucket", "detectd_queue_depth",
                   "detectd_batch_size_bucket"):
        check(series in used, f"dashboard: no panel uses {series}")


def check_dockerfile():
    df = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", df, re.M | re.I)
    check(stages and stages[-1] == "cpu", f"Dockerfile: last stage {stages[-1:]} is not cpu (the default target)")
    # `detectd healthcheck` asks /healthz (src/cli/healthcheck.rs) on DETECTD_LISTEN's port.
    check(re.search(r'^HEALTHCHECK .*\n?.*CMD \["detectd", "healthcheck"', df, re.M) is not None,
          "Dockerfile: HEALTHCHECK is not `detectd healthcheck`")
    check('"healthz"' in (ROOT / "src/cli/healthcheck.rs").read_text(), "detectd healthcheck does not ask /healthz")
    check(re.search(r"^EXPOSE 8080 50051$", df, re.M) is not None, "Dockerfile: EXPOSE 8080 50051 missing")
    check(dockerfile_uid() and 0 not in dockerfile_uid(), "Dockerfile: no non-root numeric USER")
    check("DETECTD_CACHE_DIR=/var/cache/detectd" in df, "Dockerfile: DETECTD_CACHE_DIR")
    ignore = (ROOT / ".dockerignore").read_text().split()
    for p in ("/target", "/.venv", "/.git"):
        check(p in ignore, f".dockerignore: {p} not excluded")
    # Every file of docker/ the Dockerfile copies or mounts must be let back into the context.
    used = set(re.findall(r"(?:source=|COPY\s+(?:--\S+\s+)*|RUN\s+bash\s+)(docker/[\w./-]+)", df))
    check(used, "Dockerfile: reads nothing from docker/ (the regex no longer matches?)")
    for path in sorted(used):
        check(f"!/{path.rstrip('/')}" in ignore, f".dockerignore: the Dockerfile's {path} is excluded")


def main():
    base = render(K8S)
    gpu = render(K8S / "gpu")
    listed = {Path(p).name for p in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    check(listed == on_disk, f"k8s/kustomization.yaml lists {sorted(listed)}, the folder holds {sorted(on_disk)}")
    svc = check_k8s("base", base, gpu=False)
    check_k8s("gpu", gpu, gpu=True)
    if svc:
        check_servicemonitor(svc)
    check_compose()
    check_dockerfile()
    for f in failures:
        print(f"check-manifests: FAIL {f}")
    objects = len(base) + len(gpu)
    print(f"check-manifests: {checks - len(failures)}/{checks} checks passed; {objects} Kubernetes objects "
          f"validated against the schemas of Kubernetes {' and '.join(CHECK_VERSIONS)} (strict)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
