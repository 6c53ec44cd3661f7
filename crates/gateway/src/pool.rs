//! Idle connections to runners, kept per thread and runner between calls: a connection
//! belongs to the runtime of the thread that opened it. Both of the gateway's paths keep
//! one ([`crate::fast`] raw connections, [`crate::upstream`] hyper's).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use netns::Endpoint;

/// Idle connections kept per runner and thread.
const IDLE_PER_RUNNER: usize = 256;
/// An idle connection unused for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a pool is swept of connections that ended or timed out, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A connection a pool can keep.
pub(crate) trait Pooled {
    /// Whether it can still carry a call, as far as can be told without waiting.
    fn usable(&mut self) -> bool;
}

pub(crate) struct Pool<C> {
    /// Keyed by endpoints of this server's runners, not by anything a caller sends.
    by_addr: HashMap<Endpoint, Vec<(C, Instant)>, foldhash::fast::RandomState>,
    swept: Instant,
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn new() -> Pool<C> {
        Pool { by_addr: HashMap::default(), swept: Instant::now() }
    }

    /// An idle connection to `addr` that looks usable; the unusable ones met on the way
    /// are closed.
    pub(crate) fn take(&mut self, addr: &Endpoint) -> Option<C> {
        let list = self.by_addr.get_mut(addr)?;
        while let Some((mut conn, _)) = list.pop() {
            if conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next call to `addr`, unless enough are kept already.
    pub(crate) fn put(&mut self, addr: &Endpoint, conn: C) {
        let now = Instant::now();
        let list = self.by_addr.entry(addr.clone()).or_default();
        if list.len() < IDLE_PER_RUNNER {
            list.push((conn, now));
        }
        if now.duration_since(self.swept) >= SWEEP_EVERY {
            self.sweep(now);
        }
    }

    /// Closes the idle connections whose runner has closed them (it stopped, or timed
    /// them out) and those unused for [`IDLE_TIMEOUT`], and forgets runners with none
    /// left. Runners come and go with every rollout and scale-down; without this their
    /// connections would stay open, one file each, for as long as the server runs.
    fn sweep(&mut self, now: Instant) {
        self.by_addr.retain(|_, list| {
            list.retain_mut(|(conn, since)| now.duration_since(*since) < IDLE_TIMEOUT && conn.usable());
            !list.is_empty()
        });
        self.swept = now;
    }
}
