//! What the filesystem did, counted in memory and published as JSON to the `--stats` file, so
//! that a test can prove the delays really applied.
//!
//! Publishing is synchronous for the operations the delays are about: a delayed operation
//! publishes when its delay starts (so `in_flight_delayed` shows it) and every fsync, fsyncdir
//! and write publishes before its reply is sent. So once such a call has returned to its caller,
//! the stats file already counts it. Other counters (reads, fallocates) are published by a
//! background thread within [`PUBLISH_INTERVAL`], and everything once more when the filesystem
//! stops.

use log::warn;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How often the background publisher writes the stats file when counters changed.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);

/// The delays the filesystem was started with, echoed in the stats file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayConfig {
    /// Extra time before every fsync and fdatasync of a file is performed, in milliseconds.
    pub fsync_delay_ms: u64,
    /// Extra time before every fsync of a directory is performed, in milliseconds.
    pub fsyncdir_delay_ms: u64,
    /// Write throughput limit in bytes per second; `None`: unlimited.
    pub write_bytes_per_sec: Option<u64>,
    /// Bytes that may be written at once before the throughput limit applies.
    pub write_burst_bytes: u64,
    /// Extra time before every write request is performed, in milliseconds.
    pub write_delay_ms: u64,
}

/// The content of the stats file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// The filesystem process.
    pub pid: u32,
    /// The delays in force.
    pub config: DelayConfig,
    /// fsync and fdatasync requests on files, performed (successfully or not).
    pub fsyncs: u64,
    /// Of `fsyncs`, those that asked for fdatasync.
    pub fdatasyncs: u64,
    /// fsync requests on directories, performed.
    pub fsyncdirs: u64,
    /// File and directory syncs that waited (`fsync_delay_ms`, `fsyncdir_delay_ms`) before
    /// being performed.
    pub delayed_fsyncs: u64,
    /// Time those syncs spent waiting, in nanoseconds.
    pub fsync_delay_ns: u64,
    /// Write requests performed.
    pub writes: u64,
    /// Bytes those writes wrote.
    pub bytes_written: u64,
    /// The largest single write request received, in bytes (shows whether large writes arrive
    /// whole or split by the kernel).
    pub max_write_request: u64,
    /// Write requests that waited (throughput limit or per-write delay) before being performed.
    pub delayed_writes: u64,
    /// Time those writes spent waiting, in nanoseconds.
    pub write_delay_ns: u64,
    /// Read requests performed.
    pub reads: u64,
    /// Bytes those reads returned.
    pub bytes_read: u64,
    /// fallocate requests performed.
    pub fallocates: u64,
    /// Delayed operations waiting or being performed right now.
    pub in_flight_delayed: u64,
    /// The most delayed operations ever in flight at once.
    pub max_in_flight_delayed: u64,
    /// Requests that failed with an error from the backing filesystem.
    pub errors: u64,
}

impl Stats {
    /// Reads a stats file.
    pub fn read(path: &Path) -> Result<Stats, StatsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| StatsError::Read { path: path.to_owned(), source })?;
        serde_json::from_str(&text)
            .map_err(|source| StatsError::Parse { path: path.to_owned(), source })
    }

    /// Total time syncs spent delayed.
    pub fn fsync_delay(&self) -> Duration {
        Duration::from_nanos(self.fsync_delay_ns)
    }

    /// Total time writes spent delayed.
    pub fn write_delay(&self) -> Duration {
        Duration::from_nanos(self.write_delay_ns)
    }
}

/// A stats file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read the stats file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the stats file {path} is not valid")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// The live counters. Each field matches the [`Stats`] field of the same name.
#[derive(Debug, Default)]
pub struct Counters {
    pub fsyncs: AtomicU64,
    pub fdatasyncs: AtomicU64,
    pub fsyncdirs: AtomicU64,
    pub delayed_fsyncs: AtomicU64,
    pub fsync_delay_ns: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub max_write_request: AtomicU64,
    pub delayed_writes: AtomicU64,
    pub write_delay_ns: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub fallocates: AtomicU64,
    pub in_flight_delayed: AtomicU64,
    pub max_in_flight_delayed: AtomicU64,
    pub errors: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Adds a duration, in nanoseconds, to a counter.
pub fn add_duration(counter: &AtomicU64, d: Duration) {
    add(counter, u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
}

impl Counters {
    /// A delayed operation starts waiting.
    pub fn delayed_start(&self) {
        let now = self.in_flight_delayed.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight_delayed.fetch_max(now, Ordering::Relaxed);
    }

    /// A delayed operation is done (about to reply).
    pub fn delayed_end(&self) {
        self.in_flight_delayed.fetch_sub(1, Ordering::Relaxed);
    }

    fn snapshot(&self, pid: u32, config: &DelayConfig) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            pid,
            config: config.clone(),
            fsyncs: get(&self.fsyncs),
            fdatasyncs: get(&self.fdatasyncs),
            fsyncdirs: get(&self.fsyncdirs),
            delayed_fsyncs: get(&self.delayed_fsyncs),
            fsync_delay_ns: get(&self.fsync_delay_ns),
            writes: get(&self.writes),
            bytes_written: get(&self.bytes_written),
            max_write_request: get(&self.max_write_request),
            delayed_writes: get(&self.delayed_writes),
            write_delay_ns: get(&self.write_delay_ns),
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            fallocates: get(&self.fallocates),
            in_flight_delayed: get(&self.in_flight_delayed),
            max_in_flight_delayed: get(&self.max_in_flight_delayed),
            errors: get(&self.errors),
        }
    }
}

/// The counters and the file they are published to.
#[derive(Debug)]
pub struct StatsBoard {
    pub counters: Counters,
    config: DelayConfig,
    path: Option<PathBuf>,
    /// Serializes writers, so that the file is never older than the last publish returned.
    write_lock: Mutex<()>,
    warned: AtomicBool,
}

impl StatsBoard {
    pub fn new(config: DelayConfig, path: Option<PathBuf>) -> StatsBoard {
        StatsBoard {
            counters: Counters::default(),
            config,
            path,
            write_lock: Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    /// The counters as they are now.
    pub fn snapshot(&self) -> Stats {
        self.counters.snapshot(std::process::id(), &self.config)
    }

    /// Writes the current counters to the stats file (write to a temporary file, then rename,
    /// so a reader never sees half a file). Failures are logged once and otherwise ignored: the
    /// filesystem must keep working without its stats.
    pub fn publish(&self) {
        let Some(path) = &self.path else { return };
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let stats = self.snapshot();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let result = serde_json::to_vec_pretty(&stats)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            if !self.warned.swap(true, Ordering::Relaxed) {
                warn!("cannot write the stats file {}: {e}", path.display());
            }
        }
    }
}
