//! The rendezvous store contract (a small key-value store every rank can reach) and the
//! in-process store used when all ranks are threads of one process.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A key-value store shared by the ranks of a job, used only during setup.
pub trait Store: Send + Sync {
    /// Sets `key` to `value` (overwriting).
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Returns the value of `key`, waiting for it to be set until `deadline` (then `Timeout`).
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>>;
    /// Adds `delta` to the integer stored at `key` (absent = 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
}

/// Blocks until `world` ranks have called it with the same `name`, or `deadline` passes.
/// Each name is used once per job.
pub fn store_barrier(store: &dyn Store, name: &str, world: usize, deadline: Instant) -> Result<()> {
    let arrived = store.add(&format!("{name}/count"), 1)?;
    if arrived == world as i64 {
        store.set(&format!("{name}/done"), b"1")?;
    }
    store
        .get(&format!("{name}/done"), deadline)
        .map(|_| ())
        .map_err(|e| match e {
            Error::Timeout { waited, .. } => Error::Timeout {
                op: format!("store barrier {name:?}: not every one of {world} ranks arrived"),
                waited,
            },
            other => other,
        })
}

/// A store in this process's memory, for ranks that are threads.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Parses a stored integer counter (stored as decimal text).
pub(crate) fn parse_counter(key: &str, v: &[u8]) -> Result<i64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::ProtocolViolation(format!("store key {key:?} does not hold a counter"))
        })
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let start = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: format!("store get {key:?}"),
                    waited: now - start,
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            map = self
                .changed
                .wait_timeout(map, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let cur = map
            .get(key)
            .map(|v| parse_counter(key, v))
            .transpose()?
            .unwrap_or(0);
        let new = cur.wrapping_add(delta);
        map.insert(key.to_string(), new.to_string().into_bytes());
        drop(map);
        self.changed.notify_all();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_get_waits_and_barrier_releases_all() {
        let s = MemStore::new();
        let d = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| s.get("k", d).unwrap());
            s.set("k", b"v").unwrap();
            assert_eq!(h.join().unwrap(), b"v");
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| store_barrier(&s, "b", 4, d)))
                .collect();
            for h in hs {
                h.join().unwrap().unwrap();
            }
        });
        assert_eq!(s.add("c", 5).unwrap(), 5);
        assert_eq!(s.add("c", -2).unwrap(), 3);
        let r = s.get("missing", Instant::now() + Duration::from_millis(20));
        assert!(matches!(r, Err(Error::Timeout { .. })));
        assert!(matches!(
            store_barrier(&s, "lonely", 2, Instant::now() + Duration::from_millis(20)),
            Err(Error::Timeout { .. })
        ));
    }
}
