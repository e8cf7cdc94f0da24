//! Pod metadata: the watch against a local server speaking the API's
//! list/watch, and cgroup → pod → span resource on a real process.
mod common;

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tagflow::{
    k8s::{cgroup, pods::PodCache},
    loader,
    spans::{resource::Resources, Value},
};

fn pod(uid: &str, name: &str, labels: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"shop","uid":"{uid}","resourceVersion":"11","labels":{labels}}},"spec":{{"nodeName":"node-1","containers":[{{"name":"app","image":"x"}}]}}}}"#
    )
}

const U1: &str = "11111111-2222-3333-4444-555555555555";
const U2: &str = "66666666-7777-8888-9999-000000000000";
const U3: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

/// Serves one PodList, then a watch stream that adds U3 and deletes U1.
/// Records every request's query string.
async fn fake_api(queries: Arc<Mutex<Vec<String>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let q = queries.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let q = q.clone();
                        async move {
                            let query = req.uri().query().unwrap_or("").to_string();
                            q.lock()
                                .unwrap()
                                .push(format!("{} {}", req.uri().path(), query));
                            let body: http_body_util::combinators::BoxBody<Bytes, std::io::Error> =
                                if query.contains("watch=true") {
                                    let events = vec![
                                        format!(
                                            "{{\"type\":\"ADDED\",\"object\":{}}}\n",
                                            pod(U3, "cart-2", r#"{"app":"cart"}"#)
                                        ),
                                        format!(
                                            "{{\"type\":\"DELETED\",\"object\":{}}}\n",
                                            pod(U1, "web-1", r#"{}"#)
                                        ),
                                    ];
                                    let stream =
                                        futures_util::stream::iter(events.into_iter().map(|e| {
                                            Ok::<_, std::io::Error>(Frame::data(Bytes::from(e)))
                                        }));
                                    // Then hold the watch open, as the API server does.
                                    let hold = futures_util::stream::once(async {
                                        tokio::time::sleep(Duration::from_secs(60)).await;
                                        Ok::<_, std::io::Error>(Frame::data(Bytes::new()))
                                    });
                                    use futures_util::StreamExt;
                                    BodyExt::boxed(StreamBody::new(stream.chain(hold)))
                                } else {
                                    let list = format!(
                                        r#"{{"apiVersion":"v1","kind":"PodList","metadata":{{"resourceVersion":"10"}},"items":[{},{}]}}"#,
                                        pod(
                                            U1,
                                            "web-1",
                                            r#"{"app.kubernetes.io/name":"web","app":"ignored"}"#
                                        ),
                                        pod(U2, "worker-7", r#"{}"#)
                                    );
                                    Full::new(Bytes::from(list))
                                        .map_err(|never| match never {})
                                        .boxed()
                                };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(body)
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[test]
fn the_watch_keeps_this_nodes_pods() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queries: Arc<Mutex<Vec<String>>> = Arc::default();
    let cache = Arc::new(PodCache::default());
    rt.block_on(async {
        let addr = fake_api(queries.clone()).await;
        let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(cfg).unwrap();
        tokio::spawn(tagflow::k8s::pods::watch(
            client,
            Some("node-1".into()),
            cache.clone(),
        ));
        let t0 = Instant::now();
        while !(cache.get(U3).is_some() && cache.get(U1).is_none()) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "watch events not applied: {:?}",
                queries.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let w = cache.get(U2).expect("listed pod");
    assert_eq!(
        (w.name.as_str(), w.namespace.as_str(), w.node.as_deref()),
        ("worker-7", "shop", Some("node-1"))
    );
    assert_eq!(w.service_name(), "worker-7", "no labels: the pod name");
    assert_eq!(cache.get(U3).unwrap().service_name(), "cart", "app label");
    assert_eq!(cache.len(), 2);
    let q = queries.lock().unwrap();
    assert!(
        q.iter()
            .all(|q| q.starts_with("/api/v1/pods")
                && q.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{q:?}"
    );
    assert!(q.iter().any(|q| q.contains("watch=true")), "{q:?}");
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn processes_in_pods_get_pod_resources() {
    let _g = common::lock();
    // A real process in a cgroup shaped like a kubelet's (cgroupfs driver).
    let root = loader::cgroup2_root().expect("cgroup v2");
    let id = "4f".repeat(32);
    let dir = root.join(format!("kubepods/burstable/pod{U1}/{id}"));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("mkdir {} (needs root): {e}", dir.display()));
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    let parsed = cgroup::of_pid(child.id());

    let cache = Arc::new(PodCache::default());
    let list: k8s_openapi::api::core::v1::Pod =
        serde_json::from_str(&pod(U1, "web-1", r#"{"app.kubernetes.io/name":"web"}"#)).unwrap();
    cache.apply(kube::runtime::watcher::Event::Apply(list));
    let mut res = Resources::new(None).with_pods(Some(cache), Some("node-1".into()));
    let r = res.for_pid(child.id());
    let plain = Resources::new(None).for_pid(std::process::id());

    let _ = child.kill();
    let _ = child.wait();
    for d in [
        dir.clone(),
        dir.parent().unwrap().into(),
        root.join("kubepods/burstable"),
        root.join("kubepods"),
    ] {
        let _ = std::fs::remove_dir(d);
    }
    let parsed = parsed.expect("pod cgroup parsed");
    assert_eq!(
        (parsed.pod_uid.as_str(), parsed.container_id.as_str()),
        (U1, id.as_str())
    );
    let s = |k: &str| match r.get(k) {
        Some(Value::Str(v)) => v.to_string(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(s("service.name"), "web", "from app.kubernetes.io/name");
    assert_eq!(s("k8s.pod.name"), "web-1");
    assert_eq!(s("k8s.pod.uid"), U1);
    assert_eq!(s("k8s.namespace.name"), "shop");
    assert_eq!(s("k8s.node.name"), "node-1");
    assert_eq!(s("container.id"), id);
    // Outside pods: no k8s attributes, the process name.
    assert!(plain.get("k8s.pod.name").is_none());
    assert!(matches!(plain.get("service.name"), Some(Value::Str(n)) if !n.is_empty()));
}
