//! The slow-disk fixture, proven: `crashmon-slowfs` mounted for real (FUSE; needs root and
//! /dev/fuse), exercised with the file operations crashmon-device performs in its output
//! directory, and checked against the backing directory and the fixture's own counters.
//!
//! Timing assertions are only lower bounds that show a delay applied ("the fsync took at least
//! the delay"); that other operations are not held up is checked functionally (they complete
//! while the delayed fsync has provably started waiting and not yet returned).

use anyhow::{ensure, Context, Result};
use crashmon_harness::slowfs::{self, SlowFs, SlowFsOptions};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// A backing folder and a slow filesystem mounted over a second folder, both in a temporary
/// folder. Field order matters: the mount goes before the folder is removed.
struct Rig {
    fs: SlowFs,
    dir: TempDir,
}

impl Rig {
    fn mount(options: SlowFsOptions) -> Result<Rig> {
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .is_test(true)
            .try_init();
        ensure!(Path::new("/dev/fuse").exists(), "these tests need /dev/fuse (and root)");
        let dir = tempfile::tempdir()?;
        fs::create_dir(dir.path().join("backing"))?;
        let fs = SlowFs::mount(&dir.path().join("backing"), &dir.path().join("mnt"), &options)?;
        Ok(Rig { fs, dir })
    }

    /// A path inside the mount.
    fn mnt(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    /// The same path in the backing folder.
    fn backing(&self, name: &str) -> PathBuf {
        self.dir.path().join("backing").join(name)
    }
}

/// Polls `check` every 10 ms until it holds, for at most `timeout`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check()? {
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs `op` on a thread and returns a receiver of how long it took.
fn timed_on_thread(
    op: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> mpsc::Receiver<Result<Duration>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let result = op().map(|()| start.elapsed()).map_err(anyhow::Error::from);
        let _ = tx.send(result);
    });
    rx
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn delays_apply_and_are_counted() -> Result<()> {
    let delay = Duration::from_millis(1500);
    let rate = 4 * MIB as u64; // 2 MiB take at least 500 ms
    let rig = Rig::mount(SlowFsOptions {
        fsync_delay: delay,
        write_bytes_per_sec: Some(rate),
        ..SlowFsOptions::default()
    })?;
    let stats = rig.fs.stats()?;
    assert_eq!(stats.config.fsync_delay_ms, 1500);
    assert_eq!(stats.config.fsyncdir_delay_ms, 1500);
    assert_eq!(stats.config.write_bytes_per_sec, Some(rate));
    assert_eq!((stats.fsyncs, stats.writes), (0, 0));

    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(rig.mnt("dump.partial"))?;
    let data = pattern(2 * MIB, 7);
    let start = Instant::now();
    file.write_all_at(&data[..MIB], 0)?;
    file.write_all_at(&data[MIB..], MIB as u64)?;
    let writing = start.elapsed();
    assert!(writing >= Duration::from_millis(500), "2 MiB at 4 MiB/s took only {writing:?}");

    let start = Instant::now();
    file.sync_all()?;
    assert!(start.elapsed() >= delay, "fsync took only {:?}", start.elapsed());
    let start = Instant::now();
    file.sync_data()?;
    assert!(start.elapsed() >= delay, "fdatasync took only {:?}", start.elapsed());
    let start = Instant::now();
    File::open(rig.fs.mountpoint())?.sync_all()?;
    assert!(start.elapsed() >= delay, "directory fsync took only {:?}", start.elapsed());

    let stats = rig.fs.stats()?;
    assert_eq!(stats.fsyncs, 2, "{stats:?}");
    assert_eq!(stats.fdatasyncs, 1, "{stats:?}");
    assert_eq!(stats.fsyncdirs, 1, "{stats:?}");
    assert_eq!(stats.delayed_fsyncs, 3, "{stats:?}");
    assert!(stats.fsync_delay() >= 3 * delay, "{stats:?}");
    assert_eq!(stats.writes, 2, "{stats:?}");
    assert_eq!(stats.bytes_written, 2 * MIB as u64, "{stats:?}");
    // 1 MiB pwrites reach the filesystem whole (max_write), not in 4 KiB or 128 KiB pieces.
    assert_eq!(stats.max_write_request, MIB as u64, "{stats:?}");
    assert_eq!(stats.delayed_writes, 2, "{stats:?}");
    assert!(stats.write_delay() > Duration::ZERO, "{stats:?}");
    assert_eq!(stats.in_flight_delayed, 0, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(fs::read(rig.backing("dump.partial"))?, data);
    Ok(())
}

#[test]
fn other_operations_complete_while_an_fsync_is_delayed() -> Result<()> {
    let delay = Duration::from_secs(3);
    let rig = Rig::mount(SlowFsOptions {
        fsync_delay: delay,
        write_bytes_per_sec: Some(64 * MIB as u64),
        ..SlowFsOptions::default()
    })?;
    fs::write(rig.mnt("a.dmp"), b"first dump")?;
    let a = OpenOptions::new().write(true).open(rig.mnt("a.dmp"))?;
    let fsync = timed_on_thread(move || a.sync_all());
    wait_until("the fsync waiting in its delay", Duration::from_secs(10), || {
        Ok(rig.fs.stats()?.in_flight_delayed >= 1)
    })?;

    // While it waits: everything crashmon-device does on other files.
    let b =
        OpenOptions::new().read(true).write(true).create_new(true).open(rig.mnt("b.partial"))?;
    let chunk = pattern(MIB, 3);
    b.write_all_at(&chunk, 5 * MIB as u64)?;
    let mut back = vec![0u8; MIB];
    b.read_exact_at(&mut back, 5 * MIB as u64)?;
    assert_eq!(back, chunk);
    fs::write(rig.mnt("b.json.tmp"), b"{}")?;
    fs::rename(rig.mnt("b.json.tmp"), rig.mnt("b.json"))?;
    fs::rename(rig.mnt("b.partial"), rig.mnt("b.dmp"))?;
    let mut names: Vec<String> = fs::read_dir(rig.fs.mountpoint())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    assert_eq!(names, ["a.dmp", "b.dmp", "b.json"]);
    assert_eq!(fs::metadata(rig.mnt("a.dmp"))?.len(), 10);
    assert_eq!(fs::metadata(rig.mnt("b.dmp"))?.len(), 6 * MIB as u64);
    fs::create_dir(rig.mnt("sub"))?;
    fs::remove_dir(rig.mnt("sub"))?;
    let statfs = nix::sys::statvfs::statvfs(rig.fs.mountpoint())?;
    assert!(statfs.blocks() > 0);

    assert!(
        matches!(fsync.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the other operations must complete while the fsync is still delayed"
    );
    let took = fsync.recv()??;
    assert!(took >= delay, "the fsync took only {took:?}");
    Ok(())
}

#[test]
fn delayed_fsyncs_wait_side_by_side() -> Result<()> {
    let delay = Duration::from_millis(1500);
    let rig = Rig::mount(SlowFsOptions { fsync_delay: delay, ..SlowFsOptions::default() })?;
    let mut waits = Vec::new();
    for name in ["one", "two"] {
        let file = File::create(rig.mnt(name))?;
        waits.push(timed_on_thread(move || file.sync_all()));
    }
    // Both are in their delay at once: one delay does not queue behind the other.
    wait_until("two fsyncs waiting at once", Duration::from_secs(10), || {
        Ok(rig.fs.stats()?.in_flight_delayed >= 2)
    })?;
    for wait in waits {
        let took = wait.recv()??;
        assert!(took >= delay, "an fsync took only {took:?}");
    }
    let stats = rig.fs.stats()?;
    assert_eq!((stats.fsyncs, stats.delayed_fsyncs, stats.max_in_flight_delayed), (2, 2, 2));
    Ok(())
}

#[test]
fn a_delayed_directory_fsync_does_not_stop_other_directories() -> Result<()> {
    let delay = Duration::from_secs(3);
    let rig = Rig::mount(SlowFsOptions {
        fsync_delay: Duration::ZERO,
        fsyncdir_delay: Some(delay),
        ..SlowFsOptions::default()
    })?;
    fs::create_dir(rig.mnt("out"))?;
    fs::create_dir(rig.mnt("elsewhere"))?;
    fs::write(rig.mnt("out/existing.dmp"), b"dump")?;
    let dir = File::open(rig.mnt("out"))?;
    let fsyncdir = timed_on_thread(move || dir.sync_all());
    wait_until("the directory fsync waiting in its delay", Duration::from_secs(10), || {
        Ok(rig.fs.stats()?.in_flight_delayed >= 1)
    })?;

    // The kernel holds out/'s lock meanwhile (creates in out/ itself would wait: see
    // crashmon-slowfs's fs.rs), but stat of its entries and everything elsewhere go on.
    assert_eq!(fs::metadata(rig.mnt("out/existing.dmp"))?.len(), 4);
    let f = OpenOptions::new().write(true).create_new(true).open(rig.mnt("elsewhere/x.tmp"))?;
    f.write_all_at(b"sidecar", 0)?;
    f.sync_all()?; // a file fsync: not delayed in this mount
    fs::rename(rig.mnt("elsewhere/x.tmp"), rig.mnt("elsewhere/x.json"))?;
    assert_eq!(fs::read_dir(rig.mnt("elsewhere"))?.count(), 1);

    assert!(
        matches!(fsyncdir.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the other operations must complete while the directory fsync is still delayed"
    );
    let took = fsyncdir.recv()??;
    assert!(took >= delay, "the directory fsync took only {took:?}");
    let stats = rig.fs.stats()?;
    assert_eq!((stats.fsyncdirs, stats.fsyncs, stats.delayed_fsyncs), (1, 1, 1), "{stats:?}");
    Ok(())
}

#[test]
fn per_write_delay_applies_to_each_write() -> Result<()> {
    let delay = Duration::from_millis(200);
    let rig = Rig::mount(SlowFsOptions { write_delay: delay, ..SlowFsOptions::default() })?;
    let file = File::create(rig.mnt("w"))?;
    for i in 0..3u64 {
        let start = Instant::now();
        file.write_all_at(b"abcd", i * 4)?;
        assert!(start.elapsed() >= delay, "a write took only {:?}", start.elapsed());
    }
    let stats = rig.fs.stats()?;
    assert_eq!((stats.writes, stats.delayed_writes, stats.bytes_written), (3, 3, 12));
    assert!(stats.write_delay() >= 3 * delay, "{stats:?}");
    assert_eq!(fs::read(rig.backing("w"))?, b"abcdabcdabcd");
    Ok(())
}

#[test]
fn sparse_writes_far_past_the_end_read_back_zeros_then_data() -> Result<()> {
    let rig = Rig::mount(SlowFsOptions::default())?;
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(rig.mnt("sparse"))?;
    let far = 64u64 << 30; // 64 GiB: far past the end, and past the backing disk's free space
    let data = pattern(MIB, 11);
    file.write_all_at(&data, far)?;
    assert_eq!(file.metadata()?.len(), far + MIB as u64);

    let mut zeros = vec![0xffu8; 4096];
    file.read_exact_at(&mut zeros, 0)?;
    assert!(zeros.iter().all(|&b| b == 0), "the hole reads as zeros");
    file.read_exact_at(&mut zeros, far - 4096)?;
    assert!(zeros.iter().all(|&b| b == 0), "the hole reads as zeros up to the data");
    let mut back = vec![0u8; MIB];
    file.read_exact_at(&mut back, far)?;
    assert_eq!(back, data);

    // The backing file is as sparse: a hole, then 1 MiB of data.
    let backing = fs::metadata(rig.backing("sparse"))?;
    assert_eq!(backing.len(), far + MIB as u64);
    assert!(backing.blocks() * 512 < 4 * MIB as u64, "backing file not sparse: {backing:?}");

    // SEEK_DATA / SEEK_HOLE reach the backing file.
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    assert_eq!(lseek(fd, 0, Whence::SeekHole)?, 0);
    let data_at = lseek(fd, 0, Whence::SeekData)? as u64;
    assert!(data_at <= far && far - data_at < MIB as u64, "SEEK_DATA found {data_at}");

    // fallocate reaches it too.
    nix::fcntl::fallocate(fd, nix::fcntl::FallocateFlags::empty(), 0, MIB as i64)?;
    assert!(fs::metadata(rig.backing("sparse"))?.blocks() * 512 >= 2 * MIB as u64);
    assert_eq!(lseek(fd, 0, Whence::SeekData)?, 0);
    wait_until(
        "fallocate counted",
        Duration::from_secs(5),
        || Ok(rig.fs.stats()?.fallocates == 1),
    )?;
    Ok(())
}

#[test]
fn rename_replaces_an_existing_file() -> Result<()> {
    let rig = Rig::mount(SlowFsOptions::default())?;
    fs::write(rig.mnt("vm.json"), b"{\"state\":\"open\"}")?;
    // The sidecar pattern: write a temporary file, fsync it, rename it over the old one.
    let tmp =
        OpenOptions::new().write(true).create_new(true).mode(0o644).open(rig.mnt("vm.json.tmp"))?;
    tmp.write_all_at(b"{\"state\":\"complete\"}", 0)?;
    tmp.sync_all()?;
    drop(tmp);
    fs::rename(rig.mnt("vm.json.tmp"), rig.mnt("vm.json"))?;
    File::open(rig.fs.mountpoint())?.sync_all()?;
    assert_eq!(fs::read(rig.mnt("vm.json"))?, b"{\"state\":\"complete\"}");
    assert_eq!(fs::read(rig.backing("vm.json"))?, b"{\"state\":\"complete\"}");
    assert!(!rig.mnt("vm.json.tmp").exists());
    assert_eq!(fs::read_dir(rig.fs.mountpoint())?.count(), 1);
    assert_eq!(fs::read_dir(rig.backing(""))?.count(), 1);
    // A file opened before the rename still reads the content it had.
    let old = File::open(rig.mnt("vm.json"))?;
    fs::write(rig.mnt("next.tmp"), b"third")?;
    fs::rename(rig.mnt("next.tmp"), rig.mnt("vm.json"))?;
    let mut buf = vec![0u8; 64];
    let n = old.read_at(&mut buf, 0)?;
    assert_eq!(&buf[..n], b"{\"state\":\"complete\"}");
    fs::remove_file(rig.mnt("vm.json"))?;
    assert!(!rig.backing("vm.json").exists());
    Ok(())
}

#[test]
fn flock_try_lock_conflicts_between_descriptors() -> Result<()> {
    let rig = Rig::mount(SlowFsOptions::default())?;
    let first =
        OpenOptions::new().read(true).write(true).create_new(true).open(rig.mnt("locked"))?;
    first.try_lock().context("the first lock")?;
    let second = OpenOptions::new().read(true).write(true).open(rig.mnt("locked"))?;
    assert!(
        matches!(second.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        "a second descriptor must not get the lock"
    );
    drop(first);
    second.try_lock().context("the lock, once its holder closed the file")?;
    Ok(())
}

#[test]
fn modes_ownership_and_times_pass_through() -> Result<()> {
    // Modes below are unaffected by this umask (set explicitly: the kernel applies it).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let rig = Rig::mount(SlowFsOptions::default())?;
    let mode = |p: PathBuf| -> Result<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o7777) };

    OpenOptions::new().write(true).create_new(true).mode(0o600).open(rig.mnt("dump.partial"))?;
    assert_eq!(
        (mode(rig.mnt("dump.partial"))?, mode(rig.backing("dump.partial"))?),
        (0o600, 0o600)
    );
    OpenOptions::new().write(true).create_new(true).mode(0o644).open(rig.mnt("vm.json"))?;
    assert_eq!((mode(rig.mnt("vm.json"))?, mode(rig.backing("vm.json"))?), (0o644, 0o644));
    assert!(
        OpenOptions::new().write(true).create_new(true).open(rig.mnt("vm.json")).is_err(),
        "create_new on an existing file fails"
    );
    fs::DirBuilder::new().mode(0o750).create(rig.mnt("sub"))?;
    assert_eq!((mode(rig.mnt("sub"))?, mode(rig.backing("sub"))?), (0o750, 0o750));

    fs::set_permissions(rig.mnt("dump.partial"), fs::Permissions::from_mode(0o640))?;
    assert_eq!(mode(rig.backing("dump.partial"))?, 0o640);

    // Ownership: created files are the caller's; chown passes through.
    let me = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let backing = fs::metadata(rig.backing("vm.json"))?;
    assert_eq!((backing.uid(), backing.gid()), me);
    std::os::unix::fs::chown(rig.mnt("vm.json"), Some(1234), Some(5678))?;
    let (seen, backing) =
        (fs::metadata(rig.mnt("vm.json"))?, fs::metadata(rig.backing("vm.json"))?);
    assert_eq!((seen.uid(), seen.gid()), (1234, 5678));
    assert_eq!((backing.uid(), backing.gid()), (1234, 5678));
    assert_eq!(seen.ino(), backing.ino(), "inode numbers pass through");

    // Truncate and utimens.
    let file = OpenOptions::new().write(true).open(rig.mnt("dump.partial"))?;
    file.set_len(3 * MIB as u64)?;
    assert_eq!(fs::metadata(rig.backing("dump.partial"))?.len(), 3 * MIB as u64);
    file.set_len(100)?;
    assert_eq!(fs::metadata(rig.backing("dump.partial"))?.len(), 100);
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    file.set_modified(when)?;
    assert_eq!(fs::metadata(rig.backing("dump.partial"))?.modified()?, when);
    assert_eq!(fs::metadata(rig.mnt("dump.partial"))?.modified()?, when);
    Ok(())
}

#[test]
fn statfs_shows_the_backing_filesystem() -> Result<()> {
    let rig = Rig::mount(SlowFsOptions::default())?;
    let seen = nix::sys::statvfs::statvfs(rig.fs.mountpoint())?;
    let backing = nix::sys::statvfs::statvfs(&rig.backing(""))?;
    assert_eq!(seen.blocks(), backing.blocks());
    assert_eq!(seen.block_size(), backing.block_size());
    assert_eq!(seen.fragment_size(), backing.fragment_size());
    assert_eq!(seen.files(), backing.files());
    assert_eq!(seen.name_max(), backing.name_max());
    // Free space moves as others use the disk: the same within 1% of its size.
    let slack = backing.blocks() / 100;
    assert!(seen.blocks_available().abs_diff(backing.blocks_available()) <= slack);
    assert!(seen.blocks_free().abs_diff(backing.blocks_free()) <= slack);
    Ok(())
}

#[test]
fn sigterm_unmounts_cleanly_and_drop_unmounts() -> Result<()> {
    let mut rig = Rig::mount(SlowFsOptions::default())?;
    fs::write(rig.mnt("kept"), b"data")?;
    let mountpoint = rig.fs.mountpoint().to_owned();
    assert!(rig.fs.is_mounted());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rig.fs.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    wait_until("the unmount after SIGTERM", Duration::from_secs(10), || Ok(!rig.fs.is_mounted()))?;
    let mut status = None;
    wait_until("the process to exit", Duration::from_secs(10), || {
        status = rig.fs.try_wait()?;
        Ok(status.is_some())
    })?;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}");
    assert_eq!(fs::read(rig.backing("kept"))?, b"data");

    // And dropping a live one unmounts it.
    let rig2 = Rig::mount(SlowFsOptions::default())?;
    let mountpoint2 = rig2.fs.mountpoint().to_owned();
    let Rig { fs: fs2, dir: _dir2 } = rig2;
    drop(fs2);
    assert!(slowfs::mount_at(&mountpoint2).is_none_or(|(_, source)| source != slowfs::FS_NAME));
    assert!(slowfs::mount_at(&mountpoint).is_none_or(|(_, source)| source != slowfs::FS_NAME));
    Ok(())
}

#[test]
fn bad_command_lines_fail_with_one_line() -> Result<()> {
    let binary = slowfs::locate_binary()?;
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str]| -> Result<(i32, String)> {
        let out =
            std::process::Command::new(&binary).args(args).current_dir(dir.path()).output()?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    for args in [
        &[".", ".", "--write-bytes-per-sec", "0"][..],
        &[".", ".", "--fsync-delay-ms", "soon"],
        &["/no/such/backing", "."],
        &[".", ".", "--write-burst-bytes", "5"],
    ] {
        let (code, stderr) = run(args)?;
        assert_ne!(code, 0, "{args:?} must fail");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line, got {stderr:?}");
        assert!(stderr.starts_with("crashmon-slowfs: "), "{args:?}: {stderr:?}");
    }
    Ok(())
}
