//! Who may hold a registration connection and how fast a namespace may
//! send: a cap on all connections, a cap per network namespace, and a token
//! bucket per namespace (shared by its connections), and how many /proc
//! walks a namespace may have running at once.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::Semaphore;

use crate::{ratelimit::TokenBucket, sources::targets::NsId};

/// Registration server settings (see `AgentConfig::registration`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_netns: usize,
    /// Messages per second per namespace, with a burst of the same size.
    pub rate_per_netns: u32,
    /// Open (begun, not ended) registrations per connection.
    pub max_open_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_netns: 32,
            rate_per_netns: 20_000,
            max_open_per_connection: 4096,
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Crowded {
    #[error("the agent has {0} connections")]
    Agent(usize),
    #[error("the namespace has {0} connections")]
    Namespace(usize),
}

/// /proc walks (port targets, pids of another pid namespace) one
/// namespace may run at once; its other requests wait their turn.
pub const WALKS_PER_NETNS: usize = 2;

struct Namespace {
    connections: usize,
    bucket: TokenBucket,
    walks: Arc<Semaphore>,
}

#[derive(Default)]
struct State {
    total: usize,
    per_netns: HashMap<NsId, Namespace>,
}

/// Connection counts and rate buckets; a namespace's entry lives while it
/// has a connection.
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts a new connection from `ns`, unless a cap is reached.
    pub fn admit(&self, ns: NsId) -> Result<(), Crowded> {
        let mut s = self.state.lock().expect("admission lock");
        if s.total >= self.limits.max_connections {
            return Err(Crowded::Agent(s.total));
        }
        let rate = self.limits.rate_per_netns;
        let e = s.per_netns.entry(ns).or_insert_with(|| Namespace {
            connections: 0,
            bucket: TokenBucket::new(rate, Instant::now()),
            walks: Arc::new(Semaphore::new(WALKS_PER_NETNS)),
        });
        if e.connections >= self.limits.max_connections_per_netns {
            return Err(Crowded::Namespace(e.connections));
        }
        e.connections += 1;
        s.total += 1;
        Ok(())
    }

    /// A connection admitted for `ns` closed.
    pub fn leave(&self, ns: NsId) {
        let mut s = self.state.lock().expect("admission lock");
        s.total = s.total.saturating_sub(1);
        if let Some(e) = s.per_netns.get_mut(&ns) {
            e.connections -= 1;
            if e.connections == 0 {
                s.per_netns.remove(&ns);
            }
        }
    }

    /// Whether `ns` may send one more message now.
    pub fn take_token(&self, ns: NsId) -> bool {
        let mut s = self.state.lock().expect("admission lock");
        s.per_netns
            .get_mut(&ns)
            .is_some_and(|e| e.bucket.take(Instant::now()))
    }

    /// The namespace's /proc-walk permits (while it has a connection).
    pub fn walks(&self, ns: NsId) -> Option<Arc<Semaphore>> {
        let s = self.state.lock().expect("admission lock");
        s.per_netns.get(&ns).map(|e| e.walks.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(total: usize, per_ns: usize, rate: u32) -> Admission {
        Admission::new(Limits {
            max_connections: total,
            max_connections_per_netns: per_ns,
            rate_per_netns: rate,
            ..Limits::default()
        })
    }

    #[test]
    fn one_namespace_cannot_take_every_connection() {
        let a = admission(3, 2, 10);
        let (ns1, ns2) = ((1, 1), (2, 2));
        assert_eq!(a.admit(ns1), Ok(()));
        assert_eq!(a.admit(ns1), Ok(()));
        assert_eq!(a.admit(ns1), Err(Crowded::Namespace(2)));
        assert_eq!(a.admit(ns2), Ok(()), "another pod still gets in");
        assert_eq!(a.admit(ns2), Err(Crowded::Agent(3)));
        a.leave(ns1);
        assert_eq!(a.admit(ns2), Ok(()), "a closed connection frees its slot");
    }

    #[test]
    fn the_rate_is_per_namespace_and_needs_a_connection() {
        let a = admission(10, 10, 5);
        let (ns1, ns2) = ((1, 1), (2, 2));
        assert!(!a.take_token(ns1), "no connection, no tokens");
        a.admit(ns1).unwrap();
        a.admit(ns1).unwrap();
        a.admit(ns2).unwrap();
        let sent = (0..50).filter(|_| a.take_token(ns1)).count();
        assert_eq!(sent, 5, "both connections of ns1 share one bucket");
        assert!(a.take_token(ns2), "ns2's bucket is its own");
        a.leave(ns1);
        a.leave(ns1);
        a.admit(ns1).unwrap();
        assert!(a.take_token(ns1), "a namespace that left starts afresh");
    }
}
