//! The host's limits on what a VM's dumps may take: how many are kept, their total size, the
//! free space left on the filesystem, and how often a guest may open sessions.
//!
//! A guest can bug check in a loop, or fake it (ARM, ANNOUNCE, a chunk, ABORT, again): without
//! limits it fills the host's disk. Every check that touches the disk runs in the session's
//! writer thread ([`super::writer`]), never in the vfio-user message loop; only the session
//! rate, which is counted in memory, is checked by the card itself ([`SessionRate`]).
//!
//! Old dumps are removed only to make room for a new one of the same VM, oldest first, complete
//! ones before incomplete ones (an incomplete dump may be all there is of a crash), and each
//! removal is logged and reported as an event.

use super::{CaptureConfig, COMPLETE_SUFFIX, INCOMPLETE_SUFFIX, PARTIAL_SUFFIX, SIDECAR_SUFFIX};
use crate::events::Event;
use log::warn;
use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits, with their defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Dumps kept per VM, the new one included (`--keep`).
    pub keep: Option<usize>,
    /// Total bytes of a VM's dumps, the new one included (`--max-total-size`).
    pub max_total_size: Option<u64>,
    /// Bytes that must stay free on the output filesystem (`--min-free`).
    pub min_free: u64,
    /// Sessions a VM may open per hour (`--max-sessions-per-hour`).
    pub max_sessions_per_hour: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            keep: Some(DEFAULT_KEEP),
            max_total_size: None,
            min_free: DEFAULT_MIN_FREE,
            max_sessions_per_hour: DEFAULT_SESSIONS_PER_HOUR,
        }
    }
}

/// Default `--keep`.
pub const DEFAULT_KEEP: usize = 16;
/// Default `--min-free`: 1 GiB.
pub const DEFAULT_MIN_FREE: u64 = 1 << 30;
/// Default `--max-sessions-per-hour`: a guest in a crash loop under TCG or KVM reboots in tens
/// of seconds at best, so this leaves room for real crashes and stops a guest faking them.
pub const DEFAULT_SESSIONS_PER_HOUR: u32 = 30;

/// One dump of this VM found in the output folder.
#[derive(Debug)]
struct Existing {
    base: String,
    dump: PathBuf,
    complete: bool,
    /// A `.dmp.partial` another session is writing: counted, never removed.
    live: bool,
    size: u64,
    /// Last written: orders dumps whose names carry the same second.
    modified: Option<std::time::SystemTime>,
}

/// Writers of one process list and remove dumps one at a time, so that two sessions opening
/// together do not both count the same room. Held only by writer threads, never by the card.
static ROOM: Mutex<()> = Mutex::new(());

/// Held while a dump file is created, renamed or removed outside [`Room`]: the folder is then
/// never listed mid-change (readdir may return an entry renamed during the listing twice, or
/// not at all, which made `--keep` remove one dump too many or too few).
pub(super) fn folder_change() -> std::sync::MutexGuard<'static, ()> {
    ROOM.lock().unwrap_or_else(|p| p.into_inner())
}

/// This VM's dumps in the folder, oldest first (names sort by time).
fn existing(config: &CaptureConfig) -> io::Result<Vec<Existing>> {
    let prefix = format!("{}-", config.vm_name);
    let mut found = Vec::new();
    for entry in fs::read_dir(&config.output_dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if !name.starts_with(&prefix) {
            continue;
        }
        let (base, complete, live) = if let Some(b) = name.strip_suffix(PARTIAL_SUFFIX) {
            (b, false, true)
        } else if let Some(b) = name.strip_suffix(INCOMPLETE_SUFFIX) {
            (b, false, false)
        } else if let Some(b) = name.strip_suffix(COMPLETE_SUFFIX) {
            (b, true, false)
        } else {
            continue;
        };
        // The name must be exactly <vm>-<time>-<uuid>: another VM whose name starts with this
        // one's (vm and vm-2) is not ours.
        let rest = &base[prefix.len()..];
        if rest.len() != 16 + 1 + 36 || uuid::Uuid::parse_str(&rest[17..]).is_err() {
            continue;
        }
        // A dump whose sidecar still says `streaming` is being closed by its writer right now
        // (renamed, its final sidecar not yet written): counted, not removed.
        let sidecar = config.output_dir.join(format!("{base}{SIDECAR_SUFFIX}"));
        let closing = !live
            && fs::read(&sidecar)
                .ok()
                .and_then(|b| serde_json::from_slice::<super::Sidecar>(&b).ok())
                .is_some_and(|s| s.state == super::DumpState::Streaming);
        let meta = entry.metadata()?;
        found.push(Existing {
            base: base.to_owned(),
            dump: entry.path(),
            complete,
            live: live || closing,
            size: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    // Oldest first: by the time in the name (to the second), then by when last written (the
    // rest of the name is a random UUID).
    found.sort_by(|a, b| {
        let time = |d: &Existing| d.base.get(prefix.len()..prefix.len() + 16).map(str::to_owned);
        (time(a), a.modified, &a.base).cmp(&(time(b), b.modified, &b.base))
    });
    // A dump renamed (partial to final name) while the folder was read may be listed under both
    // names (readdir may return a renamed entry twice): count it once, as live.
    found.dedup_by(|later, first| {
        let same = later.base == first.base;
        if same {
            first.live = true;
        }
        same
    });
    Ok(found)
}

/// The room a new dump has: the VM's other dumps, which the oldest of may be removed to make
/// more, oldest complete ones first.
#[derive(Debug)]
pub struct Room {
    others: Vec<Existing>,
}

impl Room {
    /// With `--max-total-size`, lists the VM's dumps and removes the oldest until the others
    /// leave some room under it. `--keep` is not applied here but by [`Room::trim`] once the new dump
    /// has bytes: a session that ends empty leaves no file, and must not have removed one.
    pub fn make(config: &CaptureConfig) -> io::Result<Room> {
        let _serial = ROOM.lock().unwrap_or_else(|p| p.into_inner());
        // Only `--max-total-size` needs the other dumps; without it the folder is not listed.
        let Some(max) = config.limits.max_total_size else {
            return Ok(Room { others: Vec::new() });
        };
        let mut room = Room { others: existing(config)? };
        while room.total() >= max && room.remove_oldest(config, "max-total-size")? {}
        Ok(room)
    }

    /// Applies `--keep` for the dump at `this` (its partial when its first bytes arrive, its
    /// final name once closed): removes the oldest closed dumps until they and this one are at
    /// most `--keep`. Dumps still being written are neither counted nor removed: each applies
    /// `--keep` itself when its first bytes arrive and again when it closes, so a burst of
    /// sessions ends with exactly `--keep` dumps, and a session that ends empty (no file)
    /// removes nothing. `this` is never removed.
    pub fn trim(config: &CaptureConfig, this: &Path) -> io::Result<()> {
        let Some(keep) = config.limits.keep else { return Ok(()) };
        let _serial = ROOM.lock().unwrap_or_else(|p| p.into_inner());
        let all = existing(config)?;
        // Gone already (another dump's trim removed it): it takes no room.
        let mine = usize::from(all.iter().any(|d| d.dump == this));
        let others = all.into_iter().filter(|d| d.dump != this && !d.live).collect();
        let mut room = Room { others };
        while room.others.len() + mine > keep.max(1) && room.remove_oldest(config, "keep")? {}
        Ok(())
    }

    /// Bytes the VM's other dumps take.
    pub fn total(&self) -> u64 {
        self.others.iter().map(|d| d.size).sum()
    }

    /// Removes the oldest removable dump (complete ones first); false if none is left.
    fn remove_oldest(&mut self, config: &CaptureConfig, limit: &str) -> io::Result<bool> {
        let pick = self
            .others
            .iter()
            .position(|d| d.complete && !d.live)
            .or_else(|| self.others.iter().position(|d| !d.live));
        let Some(i) = pick else { return Ok(false) };
        let old = self.others.remove(i);
        let sidecar = config.output_dir.join(format!("{}{SIDECAR_SUFFIX}", old.base));
        fs::remove_file(&old.dump)?;
        let _ = fs::remove_file(&sidecar);
        let detail = format!(
            "removed {} ({} bytes, {}) to make room for a new dump",
            old.dump.display(),
            old.size,
            if old.complete { "complete" } else { "incomplete" }
        );
        warn!("VM {}: {detail}", config.vm_name);
        config.events.emit(Event::Quota { limit: limit.into(), detail });
        Ok(true)
    }

    /// Why the limits stop the dump, if they do, before writing `len` more bytes that grow the
    /// file to `new_size`: older dumps are removed first to make room under
    /// `--max-total-size`; `--min-free` is checked on the filesystem.
    pub fn check_write(
        &mut self,
        config: &CaptureConfig,
        new_size: u64,
        len: u64,
    ) -> io::Result<Option<String>> {
        let limits = &config.limits;
        if let Some(max) = limits.max_total_size {
            while self.total().saturating_add(new_size) > max {
                let _serial = ROOM.lock().unwrap_or_else(|p| p.into_inner());
                if !self.remove_oldest(config, "max-total-size")? {
                    return Ok(Some(format!(
                        "quota: the VM's dumps would take {} bytes, over --max-total-size {max}",
                        self.total().saturating_add(new_size)
                    )));
                }
            }
        }
        let free = free_bytes(&config.output_dir)?;
        if free < limits.min_free.saturating_add(len) {
            return Ok(Some(format!(
                "quota: {free} bytes free on the output filesystem, --min-free is {}",
                limits.min_free
            )));
        }
        Ok(None)
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Sessions a VM opened in the last hour, counted in memory by the card.
#[derive(Debug, Default)]
pub struct SessionRate {
    opened: VecDeque<Instant>,
    /// Refusals since the last session was allowed: only the first is reported.
    refused: u64,
}

impl SessionRate {
    /// Whether one more session may open at `now` under `per_hour`; counts it if so. On
    /// refusal, how many sessions were refused in a row.
    pub fn allow(&mut self, per_hour: u32, now: Instant) -> Result<(), u64> {
        while self
            .opened
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
        {
            self.opened.pop_front();
        }
        if self.opened.len() >= per_hour as usize {
            self.refused += 1;
            return Err(self.refused);
        }
        self.opened.push_back(now);
        self.refused = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(dir: &Path, vm: &str, second: u32, complete: bool, size: usize) -> PathBuf {
        let base = format!("{vm}-20260101T0000{second:02}Z-{}", uuid::Uuid::new_v4());
        let suffix = if complete { COMPLETE_SUFFIX } else { INCOMPLETE_SUFFIX };
        let path = dir.join(format!("{base}{suffix}"));
        fs::write(&path, vec![1u8; size]).unwrap();
        fs::write(dir.join(format!("{base}{SIDECAR_SUFFIX}")), b"{}").unwrap();
        path
    }

    fn config(dir: &Path, keep: Option<usize>, max_total: Option<u64>) -> CaptureConfig {
        let mut c = CaptureConfig::new(dir, "vm", 1 << 30);
        c.limits =
            Limits { keep, max_total_size: max_total, min_free: 0, max_sessions_per_hour: 10 };
        c
    }

    #[test]
    fn keep_removes_the_oldest_complete_dumps_first_and_only_this_vms() {
        let dir = tempfile::tempdir().unwrap();
        let old_incomplete = dump(dir.path(), "vm", 1, false, 10);
        let old_complete = dump(dir.path(), "vm", 2, true, 10);
        let newer = dump(dir.path(), "vm", 3, true, 10);
        let other_vm = dump(dir.path(), "vm-2", 0, true, 10);
        // --keep counts nothing at a session's start (it may end empty)...
        // (and without --max-total-size the folder is not even listed).
        let room = Room::make(&config(dir.path(), Some(3), None)).unwrap();
        assert_eq!(room.total(), 0);
        assert!(old_complete.exists());
        // ...but once the new dump has bytes, the oldest complete dump makes room for it.
        let new =
            dir.path().join(format!("vm-20260101T000009Z-{}.dmp.partial", uuid::Uuid::new_v4()));
        fs::write(&new, b"bytes").unwrap();
        Room::trim(&config(dir.path(), Some(3), None), &new).unwrap();
        assert!(!old_complete.exists(), "the oldest complete dump went first");
        assert!(old_incomplete.exists() && newer.exists() && other_vm.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 7, "its sidecar went with it");
        Room::trim(&config(dir.path(), Some(1), None), &new).unwrap();
        assert!(!old_incomplete.exists() && !newer.exists() && other_vm.exists() && new.exists());
    }

    #[test]
    fn trim_restores_keep_once_a_dump_closes_and_never_removes_that_dump() {
        let dir = tempfile::tempdir().unwrap();
        // Three older incomplete dumps and the one just closed (complete, the newest): with
        // --keep 2, the two oldest go, never the one just closed, although complete dumps are
        // removed first.
        let a = dump(dir.path(), "vm", 1, false, 10);
        let b = dump(dir.path(), "vm", 2, false, 10);
        let c = dump(dir.path(), "vm", 3, false, 10);
        let closed = dump(dir.path(), "vm", 4, true, 10);
        Room::trim(&config(dir.path(), Some(2), None), &closed).unwrap();
        assert!(!a.exists() && !b.exists() && c.exists() && closed.exists());
        // Under the limit, nothing goes; without --keep, nothing either.
        Room::trim(&config(dir.path(), Some(2), None), &closed).unwrap();
        Room::trim(&config(dir.path(), None, None), &closed).unwrap();
        assert!(c.exists() && closed.exists());
        Room::trim(&config(dir.path(), Some(1), None), &closed).unwrap();
        assert!(!c.exists() && closed.exists());
        // A dump another trim removed already takes no room: its own trim keeps --keep others.
        let d = dump(dir.path(), "vm", 5, false, 10);
        fs::remove_file(&closed).unwrap();
        Room::trim(&config(dir.path(), Some(1), None), &closed).unwrap();
        assert!(d.exists());
    }

    #[test]
    fn a_live_partial_is_neither_counted_nor_removed_by_keep() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir
            .path()
            .join(format!("vm-20260101T000001Z-{}{PARTIAL_SUFFIX}", uuid::Uuid::new_v4()));
        fs::write(&live, b"writing").unwrap();
        let done = dump(dir.path(), "vm", 2, true, 10);
        let this = dump(dir.path(), "vm", 3, true, 10);
        // The live one applies --keep itself when it closes.
        Room::trim(&config(dir.path(), Some(2), None), &this).unwrap();
        assert!(live.exists() && done.exists());
        Room::trim(&config(dir.path(), Some(1), None), &this).unwrap();
        assert!(live.exists() && !done.exists() && this.exists());
    }

    #[test]
    fn max_total_size_makes_room_by_age_as_the_dump_grows() {
        let dir = tempfile::tempdir().unwrap();
        let a = dump(dir.path(), "vm", 1, true, 100);
        let b = dump(dir.path(), "vm", 2, true, 100);
        let c = config(dir.path(), None, Some(250));
        let mut room = Room::make(&c).unwrap();
        assert!(a.exists() && b.exists(), "room enough to start");
        assert_eq!(room.check_write(&c, 50, 50).unwrap(), None);
        assert!(a.exists());
        assert_eq!(room.check_write(&c, 120, 70).unwrap(), None);
        assert!(!a.exists() && b.exists(), "the oldest made room as the dump grew");
        assert!(room.check_write(&c, 251, 10).unwrap().unwrap().contains("--max-total-size"));
        assert!(!b.exists(), "everything older went before the dump was stopped");
    }

    #[test]
    fn min_free_stops_a_dump_before_the_disk_fills() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), None, None);
        c.limits.min_free = u64::MAX / 2;
        let mut room = Room::make(&c).unwrap();
        assert!(room.check_write(&c, 0, 4096).unwrap().unwrap().contains("--min-free"));
        c.limits.min_free = 0;
        assert_eq!(room.check_write(&c, 0, 4096).unwrap(), None);
    }

    #[test]
    fn the_session_rate_is_a_rolling_hour() {
        let mut rate = SessionRate::default();
        let t0 = Instant::now();
        assert!(rate.allow(2, t0).is_ok() && rate.allow(2, t0).is_ok());
        assert_eq!(rate.allow(2, t0), Err(1));
        assert_eq!(rate.allow(2, t0 + Duration::from_secs(60)), Err(2));
        let later = t0 + Duration::from_secs(3600);
        assert!(rate.allow(2, later).is_ok(), "an hour later there is room again");
    }
}
