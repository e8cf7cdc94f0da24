//! deploy/: every kustomization renders, every object validates against the
//! Kubernetes schemas (offline, strict), and the manifests agree with the
//! agent (config parser, defaults, probe endpoints, socket path, image).
use std::{path::Path, process::Command};

use serde_yaml::Value;
use tagflow::config::{AgentConfig, DEFAULT_SOCKET};

const K8S_VERSION: &str = "1.33.0";

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn render(dir: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP rendering {dir}: kubectl not installed ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect(),
    )
}

fn validate(docs: &[Value], what: &str) -> Result<(), String> {
    let file =
        std::env::temp_dir().join(format!("tagflow-deploy-{}-{what}.yaml", std::process::id()));
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", K8S_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate missing: `cargo xtask test` installs it (pip install kubernetes-validate)");
    let _ = std::fs::remove_file(&file);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn config(docs: &[Value]) -> AgentConfig {
    let toml = find(docs, "ConfigMap", "tagflow-agent")["data"]["agent.toml"]
        .as_str()
        .unwrap();
    AgentConfig::from_toml(toml).unwrap_or_else(|e| panic!("ConfigMap agent.toml: {e}"))
}

fn no_privileged(v: &Value, path: &str) {
    match v {
        Value::Mapping(m) => {
            for (k, x) in m {
                if k == "privileged" {
                    assert_ne!(x, &Value::Bool(true), "privileged: true at {path}");
                }
                no_privileged(x, &format!("{path}.{}", k.as_str().unwrap_or("?")));
            }
        }
        Value::Sequence(s) => s.iter().for_each(|x| no_privileged(x, path)),
        _ => {}
    }
}

fn tagflow_images(docs: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for d in docs {
        if let Some(cs) = d["spec"]["template"]["spec"]["containers"].as_sequence() {
            for c in cs {
                let img = c["image"].as_str().unwrap_or("");
                if img.starts_with("tagflow") {
                    out.push(img.to_string());
                }
            }
        }
    }
    out
}

fn check_daemonset(docs: &[Value], cfg: &AgentConfig) {
    let ds = find(docs, "DaemonSet", "tagflow-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "runs on every node"
    );
    let c = &pod["containers"][0];
    let metrics = cfg.metrics_addr.expect("metrics enabled");
    let metrics_port = metrics.port();
    // With hostNetwork, 0.0.0.0 would serve every host interface: the
    // endpoint listens on the node's IP (from the downward API) only.
    assert!(
        !metrics.ip().is_unspecified(),
        "config metrics_addr {metrics}"
    );
    let arg_list: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        arg_list.contains(&format!("--metrics-addr=$(HOST_IP):{metrics_port}").as_str()),
        "{arg_list:?}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            c[probe]["httpGet"]["path"], path,
            "{probe} path is an agent route"
        );
        assert_eq!(
            c[probe]["httpGet"]["port"].as_u64(),
            Some(metrics_port as u64),
            "{probe} port"
        );
    }
    let env = c["env"].as_sequence().unwrap();
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let host_ip = env
        .iter()
        .find(|e| e["name"] == "HOST_IP")
        .expect("HOST_IP");
    assert_eq!(
        host_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    // The socket directory is a hostPath, mounted where the config says.
    let socket_dir = cfg
        .registration
        .socket
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let m = mounts
        .iter()
        .find(|m| m["mountPath"] == socket_dir.as_str())
        .expect("socket dir mounted");
    let vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap();
    assert_eq!(vol["hostPath"]["path"], socket_dir.as_str());
    // The config file argument is the mounted ConfigMap.
    let cfg_path = arg_list[arg_list.iter().position(|a| *a == "--config").unwrap() + 1];
    let cm_mount = mounts
        .iter()
        .find(|m| cfg_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("config mounted");
    let cm_vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == cm_mount["name"])
        .unwrap();
    assert_eq!(cm_vol["configMap"]["name"], "tagflow-agent");
    // The cgroup root the config names is mounted.
    let cg = cfg
        .cgroup_root
        .as_ref()
        .expect("cgroup_root set")
        .to_str()
        .unwrap();
    assert!(
        mounts.iter().any(|m| m["mountPath"] == cg),
        "cgroup root {cg} mounted"
    );
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for cap in &caps {
        assert!(
            ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"].contains(cap),
            "unexpected capability {cap}"
        );
    }
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    // RBAC: read pods, nothing else.
    let role = find(docs, "ClusterRole", "tagflow");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["resources"][0], "pods");
    let verbs: Vec<&str> = rules[0]["verbs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(verbs, ["get", "list", "watch"]);
}

#[test]
fn overlays_render_validate_and_agree_with_the_agent() {
    let Some(base) = render("deploy/base") else {
        return;
    };
    let dev = render("deploy/overlays/dev").unwrap();
    let prod = render("deploy/overlays/prod").unwrap();
    let example = render("deploy/examples/app-with-sidecar").unwrap();
    for (what, docs) in [
        ("base", &base),
        ("dev", &dev),
        ("prod", &prod),
        ("example", &example),
    ] {
        validate(docs, what).unwrap_or_else(|e| panic!("{what} does not validate: {e}"));
        no_privileged(&Value::Sequence(docs.to_vec()), what);
    }
    // The validator can fail: an unknown field is rejected.
    let mut broken = base.clone();
    let ds = broken
        .iter_mut()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] =
        Value::String("Always".into());
    assert!(
        validate(&broken, "negative").is_err(),
        "strict validation must reject unknown fields"
    );

    for (what, docs) in [("base", &base), ("dev", &dev), ("prod", &prod)] {
        let cfg = config(docs);
        assert_eq!(
            cfg.registration.socket.to_str(),
            Some(DEFAULT_SOCKET),
            "{what}: socket path"
        );
        check_daemonset(docs, &cfg);
    }
    assert_eq!(config(&base).export.endpoint, None, "base prints spans");
    // dev: the agent exports to the bundled Jaeger's OTLP/gRPC port.
    let ep = config(&dev).export.endpoint.unwrap();
    let svc = find(&dev, "Service", "jaeger");
    assert!(
        ep.starts_with(&format!(
            "http://{}.{}.",
            svc["metadata"]["name"].as_str().unwrap(),
            svc["metadata"]["namespace"].as_str().unwrap()
        )),
        "{ep}"
    );
    let grpc = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "otlp-grpc")
        .unwrap();
    assert!(
        ep.ends_with(&format!(":{}", grpc["port"].as_u64().unwrap())),
        "{ep}"
    );
    assert!(
        config(&prod).export.endpoint.is_some(),
        "prod exports to a collector"
    );

    // The sidecar example needs nothing of the node: no agent socket, no
    // host path, no root (the agent learns requests from loopback capture).
    let dep = find(&example, "Deployment", "shop");
    let pod = &dep["spec"]["template"]["spec"];
    let sidecar = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tagflow-sidecar")
        .unwrap();
    let args: Vec<&str> = sidecar["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--agent-socket") || *a == "--register"),
        "{args:?}"
    );
    assert!(pod["volumes"].is_null(), "no volumes: {:?}", pod["volumes"]);
    // Pod Security "restricted": non-root, no escalation, no capabilities,
    // the runtime's seccomp profile.
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert!(
        sc["capabilities"]["add"].is_null(),
        "{:?}",
        sc["capabilities"]
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for c in pod["containers"].as_sequence().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{:?}", c["name"]);
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{:?}",
            c["name"]
        );
    }
    let ns = find(&example, "Namespace", "demo");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let listen: u16 = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let svc = find(&example, "Service", "shop");
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"].as_u64(),
        Some(listen as u64),
        "Service points at the sidecar"
    );

    // One image name and tag everywhere.
    let mut images: Vec<String> = [&base, &dev, &prod, &example]
        .iter()
        .flat_map(|d| tagflow_images(d))
        .collect();
    images.sort();
    images.dedup();
    assert_eq!(
        images.len(),
        1,
        "tagflow image differs between manifests: {images:?}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        images[0].ends_with(&format!(":{version}")),
        "image tag {} vs crate version {version}",
        images[0]
    );
}
