//! Progress of a dump streaming to the host, for the demo: an `indicatif` bar when stderr is a
//! terminal, plain lines otherwise (CI logs), both on stderr.
//!
//! It watches the device model's output folder: while a session streams, its dump is
//! `VMNAME-TIME-ID.dmp.partial`, renamed to `.dmp` (or `.incomplete.dmp`) when it closes. The
//! bytes received are the blocks allocated to the partial file, not its length: a guest writing
//! back to front sets the length to the end with its first chunk.

use crashmon_device_model::capture::{COMPLETE_SUFFIX, INCOMPLETE_SUFFIX, PARTIAL_SUFFIX};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the folder is looked at.
const POLL: Duration = Duration::from_millis(100);
/// How often a plain line is printed while a dump streams.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Watches an output folder and shows each new dump of one VM as it streams, until dropped.
pub struct DumpProgress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DumpProgress {
    /// Starts watching `dir` for partial dumps of `vm_name` that are not there yet. `expected`
    /// is the size a dump should reach, if known (a full dump: about the guest's RAM).
    pub fn watch(dir: &Path, vm_name: &str, expected: Option<u64>) -> DumpProgress {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = Watcher {
            dir: dir.to_owned(),
            prefix: format!("{vm_name}-"),
            expected,
            seen: dumps_in(dir, &format!("{vm_name}-")).into_iter().map(|(base, _)| base).collect(),
            terminal: std::io::stderr().is_terminal(),
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || watcher.run(&flag))
            .ok();
        DumpProgress { stop, thread }
    }

    /// Stops watching, once the dump that is streaming (if any) has been shown to its end.
    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DumpProgress {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The dumps of one VM in `dir` (names starting with `prefix`), as (base name, still partial),
/// whatever their state.
fn dumps_in(dir: &Path, prefix: &str) -> Vec<(String, bool)> {
    let mut found: Vec<(String, bool)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .filter_map(|n| {
            if let Some(base) = n.strip_suffix(PARTIAL_SUFFIX) {
                Some((base.to_owned(), true))
            } else {
                let base = n.strip_suffix(INCOMPLETE_SUFFIX).or(n.strip_suffix(COMPLETE_SUFFIX))?;
                Some((base.to_owned(), false))
            }
        })
        .collect();
    found.sort();
    found
}

/// Bytes a file holds: its allocated blocks, at most its length.
fn bytes_held(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.blocks() * 512).min(meta.len()))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

struct Watcher {
    dir: PathBuf,
    prefix: String,
    expected: Option<u64>,
    /// Dumps (base names) already shown, or there before the watch began.
    seen: HashSet<String>,
    terminal: bool,
}

impl Watcher {
    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let new = dumps_in(&self.dir, &self.prefix)
                .into_iter()
                .find(|(base, _)| !self.seen.contains(base));
            match new {
                Some((base, partial)) => {
                    self.seen.insert(base.clone());
                    // A dump that streamed between two looks is only shown closed.
                    self.follow(&base, partial, stop);
                }
                None => std::thread::sleep(POLL),
            }
        }
    }

    /// Shows one dump from its first bytes until its partial file is renamed (or the watch
    /// is stopped: a device model that died leaves its partial file behind).
    fn follow(&self, base: &str, partial: bool, stop: &AtomicBool) {
        let started = Instant::now();
        let bar = (self.terminal && partial).then(|| self.bar());
        let partial = self.dir.join(format!("{base}{PARTIAL_SUFFIX}"));
        let mut last_line = Instant::now();
        let mut received = 0;
        while let Some(bytes) = bytes_held(&partial) {
            received = bytes;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match &bar {
                Some(bar) => {
                    if bar.length().is_some_and(|len| bytes > len) {
                        bar.set_length(bytes);
                    }
                    bar.set_position(bytes);
                }
                None if last_line.elapsed() >= PLAIN_EVERY => {
                    last_line = Instant::now();
                    let rate = mib(bytes) / started.elapsed().as_secs_f64();
                    eprintln!("dump {base}: {:.1} MiB received, {rate:.1} MiB/s", mib(bytes));
                }
                None => {}
            }
            std::thread::sleep(POLL);
        }
        // Renamed: to its final name, or to .incomplete.dmp if the session ended early.
        let complete = self.dir.join(format!("{base}{COMPLETE_SUFFIX}"));
        let incomplete = self.dir.join(format!("{base}{INCOMPLETE_SUFFIX}"));
        let (state, size) = match (bytes_held(&complete), bytes_held(&incomplete)) {
            (Some(size), _) => ("complete", size),
            (None, Some(size)) => ("incomplete", size),
            (None, None) => ("not closed", received),
        };
        let seconds = started.elapsed().as_secs_f64();
        let line = if seconds >= 0.5 {
            format!(
                "dump {base}: {state}, {:.1} MiB in {seconds:.1} s ({:.1} MiB/s)",
                mib(size),
                mib(size) / seconds
            )
        } else {
            format!("dump {base}: {state}, {:.1} MiB", mib(size))
        };
        match bar {
            Some(bar) => {
                bar.set_length(size);
                bar.set_position(size);
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            None => eprintln!("{line}"),
        }
    }

    fn bar(&self) -> ProgressBar {
        let (bar, template) = match self.expected {
            Some(len) => (
                ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()),
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{prefix} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
            ),
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix("dump");
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_new_partial_dump_to_its_rename() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("vm-1-old.dmp.partial");
        std::fs::write(&old, b"left by an earlier run").unwrap();
        let progress = DumpProgress::watch(dir.path(), "vm", Some(1 << 20));
        let partial = dir.path().join("vm-2-new.dmp.partial");
        std::fs::write(&partial, vec![1u8; 64 << 10]).unwrap();
        std::thread::sleep(POLL * 3);
        std::fs::rename(&partial, dir.path().join("vm-2-new.dmp")).unwrap();
        std::thread::sleep(POLL * 3);
        progress.finish();
        assert!(old.exists(), "the watcher only looks");
    }
}
