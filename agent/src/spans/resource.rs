//! The resource (service) of a span: by default the name of the process
//! that owns the flow, with host and pid attributes.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{kv, Resource, Value};

pub struct Resources {
    host: String,
    /// Used when a process's name cannot be read (it exited): OTEL_SERVICE_NAME.
    fallback: String,
    cache: HashMap<u32, (Arc<Resource>, Instant)>,
    ttl: Duration,
}

impl Resources {
    pub fn new(fallback: Option<String>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            host,
            fallback: fallback.unwrap_or_else(|| "unknown_service".into()),
            cache: HashMap::new(),
            ttl: Duration::from_secs(60),
        }
    }

    pub fn for_pid(&mut self, pid: u32) -> Arc<Resource> {
        let now = Instant::now();
        if let Some((r, t)) = self.cache.get(&pid) {
            if now.duration_since(*t) < self.ttl {
                return r.clone();
            }
        }
        let name = (pid != 0)
            .then(|| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
            .flatten()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.fallback.clone());
        let mut attributes = vec![
            kv("service.name", Value::Str(name)),
            kv("host.name", Value::Str(self.host.clone())),
        ];
        if pid != 0 {
            attributes.push(kv("process.pid", Value::Int(pid as i64)));
        }
        let r = Arc::new(Resource { attributes });
        if self.cache.len() > 16384 {
            self.cache
                .retain(|_, (_, t)| now.duration_since(*t) < self.ttl);
        }
        self.cache.insert(pid, (r.clone(), now));
        r
    }
}
