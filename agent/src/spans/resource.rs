//! The resource (service) of a span. In a cluster: the pod's
//! `app.kubernetes.io/name` label, then `app`, then the pod name, with
//! `k8s.*` and `container.id` attributes. Elsewhere, or for processes
//! outside pods: the process name. Always `host.name` and `process.pid`.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{kv, Resource, Value};
use crate::k8s::{cgroup, pods::PodCache};

pub struct Resources {
    host: String,
    /// Used when a process's name cannot be read (it exited): OTEL_SERVICE_NAME.
    fallback: String,
    pods: Option<Arc<PodCache>>,
    node: Option<String>,
    cache: HashMap<u32, (Arc<Resource>, Instant, Duration)>,
}

/// How long a pid's resource is reused; shorter while its pod is not known
/// yet (the watch may lag a new pod).
const TTL: Duration = Duration::from_secs(60);
const TTL_POD_PENDING: Duration = Duration::from_secs(5);

impl Resources {
    pub fn new(fallback: Option<String>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            host,
            fallback: fallback.unwrap_or_else(|| "unknown_service".into()),
            pods: None,
            node: None,
            cache: HashMap::new(),
        }
    }

    /// Adds pod metadata from a watch of this node's pods.
    pub fn with_pods(mut self, pods: Option<Arc<PodCache>>, node: Option<String>) -> Self {
        self.pods = pods;
        self.node = node;
        self
    }

    pub fn for_pid(&mut self, pid: u32) -> Arc<Resource> {
        let now = Instant::now();
        if let Some((r, t, ttl)) = self.cache.get(&pid) {
            if now.duration_since(*t) < *ttl {
                return r.clone();
            }
        }
        let container = (pid != 0 && self.pods.is_some())
            .then(|| cgroup::of_pid(pid))
            .flatten();
        let pod = container
            .as_ref()
            .and_then(|c| self.pods.as_ref()?.get(&c.pod_uid));
        let process = (pid != 0)
            .then(|| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
            .flatten()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let service = match &pod {
            Some(p) => p.service_name(),
            None => process.unwrap_or_else(|| self.fallback.clone()),
        };
        let mut attributes = vec![
            kv("service.name", Value::Str(service.into())),
            kv("host.name", Value::Str(self.host.clone().into())),
        ];
        if pid != 0 {
            attributes.push(kv("process.pid", Value::Int(pid as i64)));
        }
        if let Some(p) = &pod {
            attributes.push(kv("k8s.pod.name", Value::Str(p.name.clone().into())));
            attributes.push(kv("k8s.pod.uid", Value::Str(p.uid.clone().into())));
            attributes.push(kv(
                "k8s.namespace.name",
                Value::Str(p.namespace.clone().into()),
            ));
            if let Some(n) = p.node.as_ref().or(self.node.as_ref()) {
                attributes.push(kv("k8s.node.name", Value::Str(n.clone().into())));
            }
        }
        if let Some(c) = container.as_ref().filter(|c| !c.container_id.is_empty()) {
            attributes.push(kv(
                "container.id",
                Value::Str(c.container_id.clone().into()),
            ));
        }
        let ttl = if container.is_some() && pod.is_none() {
            TTL_POD_PENDING
        } else {
            TTL
        };
        let r = Arc::new(Resource { attributes });
        if self.cache.len() > 16384 {
            self.cache
                .retain(|_, (_, t, ttl)| now.duration_since(*t) < *ttl);
            if self.cache.len() > 16384 {
                self.cache.clear();
            }
        }
        self.cache.insert(pid, (r.clone(), now, ttl));
        r
    }
}
