//! The file rendezvous store: one file per key in a directory every rank can see
//! (`XCCL_STORE=file:///dir`, or a per-job directory under the temp dir for `mpirun`).

use super::store::{parse_counter, Store};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A store kept in files of one directory. Writes are atomic (write, then rename); counters
/// are updated under `flock`.
pub struct FileStore {
    dir: PathBuf,
}

/// Keys map to file names: letters, digits, `-`, `.` kept; anything else `_xx` in hex.
fn file_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    format!("k{out}")
}

/// Removes every key under `prefix/` from the store directory `dir` (best effort: a key that
/// cannot be removed is left for the directory's owner).
pub(crate) fn remove_namespace(dir: &Path, prefix: &str) {
    let start = file_name(&format!("{prefix}/"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&start) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::system(format!("creating store directory {}", dir.display()), e))
}

impl FileStore {
    /// Uses (and creates, mode 0700) `dir`.
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        Ok(FileStore { dir })
    }

    /// Opens a new file in the directory, creating the directory again if the end of another
    /// communicator's setup removed it meanwhile.
    fn create_file(&self, path: &Path, exclusive: bool) -> std::io::Result<File> {
        let open = || {
            let mut o = OpenOptions::new();
            o.read(true).write(true).mode(0o600);
            if exclusive {
                o.create_new(true);
            } else {
                o.create(true).truncate(false);
            }
            o.open(path)
        };
        match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_dir(&self.dir).map_err(|_| e)?;
                open()
            }
            other => other,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }
}

use std::os::unix::fs::DirBuilderExt;

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let dst = self.path(key);
        let mut rnd = [0u8; 8];
        super::fill_random(&mut rnd);
        let tmp = self
            .dir
            .join(format!(".tmp-{:016x}", u64::from_le_bytes(rnd)));
        let io = |e| {
            Error::system(
                format!("writing store key {key:?} in {}", self.dir.display()),
                e,
            )
        };
        let mut f = self.create_file(&tmp, true).map_err(io)?;
        f.write_all(value).map_err(io)?;
        drop(f);
        fs::rename(&tmp, &dst).map_err(io)
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let start = Instant::now();
        let path = self.path(key);
        let mut backoff = Duration::from_millis(1);
        loop {
            match fs::read(&path) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::system(format!("reading {}", path.display()), e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op: format!("store get {key:?}"),
                    waited: start.elapsed(),
                });
            }
            // Polling pace of a file-based store, not synchronisation.
            std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let path = self.path(&format!("{key}#counter"));
        let io = |e| {
            Error::system(
                format!("updating counter {key:?} in {}", self.dir.display()),
                e,
            )
        };
        let mut f: File = self.create_file(&path, false).map_err(io)?;
        // Released when `f` closes.
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(e.into()))?;
        let mut cur = String::new();
        f.read_to_string(&mut cur).map_err(io)?;
        let cur = if cur.is_empty() {
            0
        } else {
            parse_counter(key, cur.as_bytes())?
        };
        let new = cur.wrapping_add(delta);
        f.set_len(0).map_err(io)?;
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(new.to_string().as_bytes()).map_err(io)?;
        // Readers of the counter through `get` see it as a plain key too.
        self.set(key, new.to_string().as_bytes())?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::store::store_barrier;

    #[test]
    fn file_store_round_trip_and_barrier() {
        let dir = std::env::temp_dir().join(format!("xccl-fs-test-{}", std::process::id()));
        let s = FileStore::new(&dir).unwrap();
        let d = Instant::now() + Duration::from_secs(10);
        s.set("a/b c", b"v1").unwrap();
        assert_eq!(s.get("a/b c", d).unwrap(), b"v1");
        std::thread::scope(|sc| {
            for _ in 0..3 {
                let dir = dir.clone();
                sc.spawn(move || {
                    store_barrier(&FileStore::new(dir).unwrap(), "bar", 3, d).unwrap()
                });
            }
        });
        assert_eq!(s.add("n", 2).unwrap(), 2);
        assert_eq!(s.get("n", d).unwrap(), b"2");
        fs::remove_dir_all(&dir).unwrap();
    }
}
