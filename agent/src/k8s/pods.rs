//! Pods of this node, from the API server (a watch with
//! `spec.nodeName=<NODE_NAME>`), kept in memory by UID.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::watcher::{self, Event},
    Api, Client,
};
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl PodMeta {
    /// `app.kubernetes.io/name`, then `app`, then the pod name.
    pub fn service_name(&self) -> String {
        self.labels
            .get("app.kubernetes.io/name")
            .or_else(|| self.labels.get("app"))
            .cloned()
            .unwrap_or_else(|| self.name.clone())
    }

    pub fn from_pod(p: &Pod) -> Option<Self> {
        let m = &p.metadata;
        Some(Self {
            uid: m.uid.clone()?,
            name: m.name.clone()?,
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            labels: m.labels.clone().unwrap_or_default(),
        })
    }
}

#[derive(Default, Debug)]
pub struct PodCache {
    by_uid: RwLock<HashMap<String, PodMeta>>,
    /// Built during a (re)list, swapped in when it completes.
    pending: RwLock<Option<HashMap<String, PodMeta>>>,
}

impl PodCache {
    pub fn get(&self, uid: &str) -> Option<PodMeta> {
        self.by_uid
            .read()
            .expect("pod cache lock")
            .get(uid)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_uid.read().expect("pod cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn apply(&self, ev: Event<Pod>) {
        match ev {
            Event::Init => *self.pending.write().expect("lock") = Some(HashMap::new()),
            Event::InitApply(p) => {
                if let (Some(m), Some(pending)) = (
                    PodMeta::from_pod(&p),
                    self.pending.write().expect("lock").as_mut(),
                ) {
                    pending.insert(m.uid.clone(), m);
                }
            }
            Event::InitDone => {
                if let Some(all) = self.pending.write().expect("lock").take() {
                    *self.by_uid.write().expect("lock") = all;
                }
            }
            Event::Apply(p) => {
                if let Some(m) = PodMeta::from_pod(&p) {
                    self.by_uid.write().expect("lock").insert(m.uid.clone(), m);
                }
            }
            Event::Delete(p) => {
                if let Some(uid) = p.metadata.uid {
                    self.by_uid.write().expect("lock").remove(&uid);
                }
            }
        }
    }
}

/// Watches this node's pods into `cache` until the process exits; the
/// watcher re-lists and backs off by itself on errors.
pub async fn watch(client: Client, node: Option<String>, cache: Arc<PodCache>) {
    let api: Api<Pod> = Api::all(client);
    let mut cfg = watcher::Config::default();
    if let Some(n) = &node {
        cfg = cfg.fields(&format!("spec.nodeName={n}"));
    }
    let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(api, cfg));
    futures_util::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => cache.apply(ev),
            Ok(None) => return,
            Err(e) => warn!("pod watch: {e}"),
        }
    }
}

/// Starts the watch with the in-cluster configuration; None (and the agent
/// works without pod metadata) outside a cluster.
pub async fn start(node: Option<String>) -> Option<Arc<PodCache>> {
    std::env::var_os("KUBERNETES_SERVICE_HOST")?;
    let client = match kube::Config::incluster()
        .map_err(|e| e.to_string())
        .and_then(|c| Client::try_from(c).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "in a cluster but no usable in-cluster config ({e}); spans carry no pod metadata"
            );
            return None;
        }
    };
    let cache = Arc::new(PodCache::default());
    info!(
        node = node.as_deref().unwrap_or("(all)"),
        "watching pods for span metadata"
    );
    tokio::spawn(watch(client, node, cache.clone()));
    Some(cache)
}
