//! A store seen through a key prefix: each communicator's setup lives in its own namespace of
//! the job's store, so communicators built one after another, or at the same time, never read
//! each other's keys.

use super::Store;
use crate::error::Result;
use std::sync::Arc;
use std::time::Instant;

/// Every key of `inner` under `prefix/`.
pub struct Prefixed {
    inner: Arc<dyn Store>,
    prefix: String,
}

impl Prefixed {
    /// Keys of `inner` under `prefix/`.
    pub fn new(inner: Arc<dyn Store>, prefix: impl Into<String>) -> Self {
        Prefixed {
            inner,
            prefix: prefix.into(),
        }
    }

    /// The prefix (without the trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }
}

impl Store for Prefixed {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.key(key), value)
    }
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        self.inner.get(&self.key(key), deadline)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.key(key), delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::MemStore;
    use std::time::Duration;

    #[test]
    fn namespaces_do_not_meet() {
        let base: Arc<dyn Store> = Arc::new(MemStore::new());
        let (a, b) = (
            Prefixed::new(base.clone(), "c1"),
            Prefixed::new(base.clone(), "c2"),
        );
        a.set("k", b"one").unwrap();
        b.set("k", b"two").unwrap();
        let d = Instant::now() + Duration::from_secs(1);
        assert_eq!(a.get("k", d).unwrap(), b"one");
        assert_eq!(b.get("k", d).unwrap(), b"two");
        assert_eq!(base.get("c1/k", d).unwrap(), b"one");
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 5).unwrap(), 5);
    }
}
