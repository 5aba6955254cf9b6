//! Shared test fixtures: temporary directories, pty pairs from socat, site configs.
#![allow(dead_code)]

pub mod daemon;
pub mod mosquitto;
pub mod observe;
pub mod proxy;
pub mod site;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("headend-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    /// A path inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two connected pseudo-terminals made by socat (a null-modem cable in software).
pub struct PtyPair {
    /// One end (the meter side in tests).
    pub a: String,
    /// The other end (the head-end side).
    pub b: String,
    child: Child,
    _dir: TempDir,
}

impl PtyPair {
    /// Start socat and wait until it reports both ends ready (no sleeping: we read its log).
    pub fn new() -> Self {
        let dir = TempDir::new("pty");
        let a = dir.path("meter");
        let b = dir.path("headend");
        let mut child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("socat is installed (.ci/run installs it)");
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("starting data transfer loop") => break,
                Some(Ok(_)) => continue,
                other => panic!("socat ended before the ptys were ready: {other:?}"),
            }
        }
        // Keep draining socat's log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { a: path_str(&a), b: path_str(&b), child, _dir: dir }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
