//! `crashmon-slowfs`: a FUSE passthrough filesystem that makes a real, slow disk out of a
//! directory, so that crashmon's device model can be tested against one end to end.
//!
//! The mount shows the backing directory as it is (modes, ownership, sparse files, `statfs`),
//! but every fsync, fdatasync and fsyncdir waits `--fsync-delay-ms` before it is performed, and
//! writes are throttled to `--write-bytes-per-sec` (plus `--write-delay-ms` each). The delays
//! never hold up other operations: see [`fs`]. What it did is counted in a JSON stats file
//! ([`stats::Stats`]).
//!
//! * [`fs`]: the filesystem;
//! * [`throttle`]: the delays and the write token bucket;
//! * [`stats`]: the counters and the stats file (also read by crashmon's harness).

pub mod fs;
pub mod stats;
pub mod throttle;

pub use stats::{DelayConfig, Stats, StatsError};

/// What `crashmon-slowfs` prints on standard output, followed by a space and the mount point,
/// once the filesystem is mounted and serving.
pub const READY_LINE: &str = "mounted";

/// The mount's source, as shown in `/proc/self/mountinfo` (file-system type `fuse`).
pub const FS_NAME: &str = "crashmon-slowfs";
