//! The passthrough filesystem: every operation is performed on the backing directory, and
//! syncs and writes are delayed first.
//!
//! # Inodes
//!
//! Each inode the kernel knows of is held as an `O_PATH` descriptor of the backing file (as in
//! libfuse's `passthrough_ll`), so operations by name use the `*at()` system calls relative to
//! the parent's descriptor and a rename in the backing directory never leaves a stale path
//! behind. The FUSE node id is the backing file's inode number (fuser reports the node id as
//! `st_ino`, so `stat` through the mount shows the backing inode numbers), except for the root
//! (always 1) and the rare number that would collide (1, or a file on another device below the
//! backing directory), which get a synthetic id.
//!
//! # Delays never block other operations
//!
//! fuser's session reads requests on a few threads (see `main.rs`), but a delay must not
//! occupy one of them: four 30-second fsyncs would otherwise stop the whole filesystem, which a
//! real slow disk does not do to `stat`. So a delayed fsync, fsyncdir or write moves its
//! `Reply*` object (they are `Send`) to a thread of its own, which sleeps, performs the
//! operation on the backing file and replies; the session thread returns to the kernel at once.
//! Operations without a delay run inline. One thread per delayed operation is unbounded in
//! principle, but the kernel bounds it: each delayed request is a system call some thread of
//! the caller is blocked in.
//!
//! What this cannot change is the kernel's own locking around a FUSE request: `fsync` holds
//! the file's inode lock while FUSE_FSYNC is outstanding, and `fsync` of a directory holds the
//! directory's inode lock while FUSE_FSYNCDIR is. So during a delayed directory fsync, creating,
//! renaming or unlinking entries of that same directory (and listing it) waits too, which a
//! local filesystem such as ext4 does not do; and during a delayed file fsync, so do writes to
//! that same file. `stat` of existing entries, and everything on other files and directories,
//! is unaffected. (`--fsyncdir-delay-ms` sets the directory delay on its own, for a test that
//! wants slow file syncs without this effect.)
//!
//! # Writes
//!
//! The writeback cache is not enabled, so every `write(2)` reaches this filesystem before it
//! returns (split only at `max_write`, 1 MiB) and waits for its throughput share there. The
//! kernel serializes writes to one file (inode lock), so delayed writes to a file are performed
//! in order.
//!
//! # Locks
//!
//! fuser does not ask for `FUSE_FLOCK_LOCKS` or `FUSE_POSIX_LOCKS`, so `flock` and `fcntl`
//! locks are handled by the kernel for this mount alone: they conflict between users of the
//! mount (as on a local disk) but not with users of the backing directory itself.

use crate::stats::{self, StatsBoard};
use crate::throttle::Delays;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, warn};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Stat, Timespec, Timestamps};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache names and attributes. Short, because the backing directory
/// may also be changed directly (a test inspecting it, say).
const TTL: Duration = Duration::from_secs(1);

/// The largest write request to accept: 1 MiB, which is also the kernel's default limit
/// (`/proc/sys/fs/fuse/max_pages_limit`, 256 pages), so 1 MiB `pwrite`s arrive whole.
pub const MAX_WRITE: u32 = 1 << 20;

/// Synthetic node ids start here, far above any real inode number.
const SYNTHETIC_BASE: u64 = 1 << 62;

type FsResult<T> = Result<T, Errno>;

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn io_errno(e: io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

/// `/proc/self/fd/N`: reopens (or names) what descriptor N refers to.
fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn system_time(secs: i64, nanos: u64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.min(999_999_999));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & 0o170000 {
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o010000 => FileType::NamedPipe,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o140000 => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr_of(id: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// `stat` of what an `O_PATH` descriptor refers to (not following a symlink).
fn stat_fd(fd: &OwnedFd) -> FsResult<Stat> {
    rfs::statat(fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
}

/// One inode the kernel holds a reference to.
#[derive(Debug)]
struct Node {
    /// `O_PATH` descriptor of the backing file.
    fd: OwnedFd,
    key: (u64, u64),
}

#[derive(Debug)]
struct NodeSlot {
    node: Arc<Node>,
    /// The kernel's lookup count; the node is dropped when `forget` brings it to 0.
    nlookup: u64,
}

#[derive(Debug, Default)]
struct NodeTable {
    by_id: HashMap<u64, NodeSlot>,
    by_key: HashMap<(u64, u64), u64>,
    next_synthetic: u64,
}

/// An open file or directory.
#[derive(Debug)]
enum Handle {
    File(Arc<File>),
    Dir { file: Arc<File>, entries: Mutex<Vec<DirEntry>> },
}

#[derive(Debug, Clone)]
struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// The filesystem's settings.
#[derive(Debug)]
pub struct SlowFsConfig {
    /// The directory whose content the mount shows.
    pub backing: PathBuf,
    /// The delays.
    pub delays: Delays,
}

/// State shared with the threads that perform delayed operations.
#[derive(Debug)]
struct Shared {
    delays: Delays,
    stats: Arc<StatsBoard>,
}

/// The passthrough filesystem (see the module documentation).
#[derive(Debug)]
pub struct SlowFs {
    shared: Arc<Shared>,
    root_dev: u64,
    nodes: Mutex<NodeTable>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    /// Whether to give new files the caller's ownership (only root can).
    chown_new: bool,
}

impl SlowFs {
    /// Opens the backing directory. The descriptor is taken before mounting, so the mount may
    /// even cover the backing directory itself.
    pub fn new(config: SlowFsConfig, stats: Arc<StatsBoard>) -> io::Result<SlowFs> {
        let fd = rfs::open(
            &config.backing,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rfs::fstat(&fd)?;
        let key = (st.st_dev, st.st_ino);
        let mut table = NodeTable { next_synthetic: SYNTHETIC_BASE, ..NodeTable::default() };
        table.by_id.insert(1, NodeSlot { node: Arc::new(Node { fd, key }), nlookup: 1 });
        table.by_key.insert(key, 1);
        Ok(SlowFs {
            shared: Arc::new(Shared { delays: config.delays, stats }),
            root_dev: st.st_dev,
            nodes: Mutex::new(table),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            chown_new: rustix::process::geteuid().is_root(),
        })
    }

    fn counters(&self) -> &stats::Counters {
        &self.shared.stats.counters
    }

    fn node(&self, id: INodeNo) -> FsResult<Arc<Node>> {
        let table = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        table.by_id.get(&id.0).map(|slot| slot.node.clone()).ok_or(Errno::ESTALE)
    }

    /// Records one more kernel reference to the backing file `fd` (with status `st`) and
    /// returns its node id.
    fn remember(&self, fd: OwnedFd, st: &Stat) -> u64 {
        let key = (st.st_dev, st.st_ino);
        let mut table = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = table.by_key.get(&key) {
            if let Some(slot) = table.by_id.get_mut(&id) {
                slot.nlookup += 1;
                return id;
            }
        }
        let natural = st.st_dev == self.root_dev && st.st_ino > 1 && st.st_ino < SYNTHETIC_BASE;
        let id = if natural && !table.by_id.contains_key(&st.st_ino) {
            st.st_ino
        } else {
            table.next_synthetic += 1;
            table.next_synthetic
        };
        table.by_id.insert(id, NodeSlot { node: Arc::new(Node { fd, key }), nlookup: 1 });
        table.by_key.insert(key, id);
        id
    }

    /// Looks `name` up in `parent` and takes a reference to it.
    fn do_lookup(&self, parent: &Node, name: &OsStr) -> FsResult<FileAttr> {
        let fd = rfs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = stat_fd(&fd)?;
        let id = self.remember(fd, &st);
        Ok(attr_of(id, &st))
    }

    /// Gives a new file the caller's ownership when running as root (the files would be
    /// root's otherwise). The group is the parent's when the parent is set-group-ID, as the
    /// kernel does. `fd` may be an `O_PATH` descriptor.
    fn own_new(&self, req: &Request, parent: &Node, fd: &OwnedFd) -> FsResult<()> {
        if !self.chown_new {
            return Ok(());
        }
        let st = stat_fd(fd)?;
        let parent_st = stat_fd(&parent.fd)?;
        let gid = if parent_st.st_mode & 0o2000 != 0 { parent_st.st_gid } else { req.gid() };
        if st.st_uid == req.uid() && st.st_gid == gid {
            return Ok(());
        }
        rfs::chownat(
            fd,
            "",
            Some(rfs::Uid::from_raw(req.uid())),
            Some(rfs::Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)?;
        // chown clears the set-user-ID and set-group-ID bits of a regular file: put the
        // requested mode back.
        if st.st_mode & 0o6000 != 0 && kind_of(st.st_mode) != FileType::Symlink {
            rfs::chmodat(
                rfs::CWD,
                proc_path(fd),
                Mode::from_raw_mode(st.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        Ok(())
    }

    /// After `mkdir`, `mknod` or `symlink` made `name` in `parent`: owns it and looks it up.
    fn finish_new(&self, req: &Request, parent: &Node, name: &OsStr) -> FsResult<FileAttr> {
        let fd = rfs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        self.own_new(req, parent, &fd)?;
        let st = stat_fd(&fd)?;
        let id = self.remember(fd, &st);
        Ok(attr_of(id, &st))
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, Arc::new(handle));
        fh
    }

    fn handle(&self, fh: FileHandle) -> FsResult<Arc<Handle>> {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        handles.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn file(&self, fh: FileHandle) -> FsResult<Arc<File>> {
        match &*self.handle(fh)? {
            Handle::File(file) => Ok(file.clone()),
            Handle::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    fn drop_handle(&self, fh: FileHandle) {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
    }

    /// Flags to open the backing file with, for an open request with `flags`. O_DIRECT would
    /// need aligned buffers, which the kernel's requests are not; O_NOCTTY, and O_CREAT and
    /// O_EXCL on an open (not a create), mean nothing here.
    fn backing_flags(flags: i32) -> OFlags {
        let drop = OFlags::DIRECT | OFlags::NOCTTY | OFlags::CREATE | OFlags::EXCL;
        (OFlags::from_bits_retain(flags as u32) - drop) | OFlags::CLOEXEC
    }

    fn count_error(&self) {
        stats::add(&self.counters().errors, 1);
    }

    /// Runs `op` now if `delay` is zero, else on a thread of its own after `delay` (see the
    /// module documentation). `op` gets the time actually waited; when that is not zero, it
    /// must call [`stats::Counters::delayed_end`] before it publishes the stats and replies.
    fn after(
        &self,
        delay: Duration,
        what: &'static str,
        op: impl FnOnce(Duration) + Send + 'static,
    ) {
        if delay.is_zero() {
            op(Duration::ZERO);
            return;
        }
        self.counters().delayed_start();
        self.shared.stats.publish();
        let start = Instant::now();
        let spawned =
            std::thread::Builder::new().name(format!("delayed-{what}")).spawn(move || {
                std::thread::sleep(delay);
                op(start.elapsed());
            });
        if let Err(e) = spawned {
            // The closure, and with it the reply, is gone: the kernel gets EIO for it.
            warn!("cannot start a thread for a delayed {what}: {e}");
            self.counters().delayed_end();
        }
    }

    /// fsync or fdatasync of a file or directory, after the fsync delay.
    fn sync(&self, file: Arc<File>, datasync: bool, dir: bool, reply: ReplyEmpty) {
        let shared = self.shared.clone();
        let delay = if dir { self.shared.delays.fsyncdir } else { self.shared.delays.fsync };
        self.after(delay, if dir { "fsyncdir" } else { "fsync" }, move |waited| {
            let result = if datasync { rfs::fdatasync(&*file) } else { rfs::fsync(&*file) };
            let c = &shared.stats.counters;
            stats::add(if dir { &c.fsyncdirs } else { &c.fsyncs }, 1);
            if datasync && !dir {
                stats::add(&c.fdatasyncs, 1);
            }
            if !waited.is_zero() {
                stats::add(&c.delayed_fsyncs, 1);
                stats::add_duration(&c.fsync_delay_ns, waited);
                c.delayed_end();
            }
            if result.is_err() {
                stats::add(&c.errors, 1);
            }
            shared.stats.publish();
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

/// Writes all of `data` at `offset`.
fn write_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(data, offset)
}

/// Reads up to `size` bytes at `offset`, short only at end of file.
fn read_full_at(file: &File, size: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn timespec(t: TimeOrNow) -> Timespec {
    match t {
        TimeOrNow::Now => Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_NOW },
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos().into() },
            Err(e) => {
                let d = e.duration();
                let (secs, nanos) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - i64::from(d.subsec_nanos()))
                };
                Timespec { tv_sec: secs, tv_nsec: nanos }
            }
        },
    }
}

const OMIT: Timespec = Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_OMIT };

impl Filesystem for SlowFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            warn!("max_write {MAX_WRITE} refused, using {max}");
            let _ = config.set_max_write(max);
        }
        // Lookups and readdirs in one directory may run concurrently (else the kernel
        // serializes them per directory).
        if config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS).is_err() {
            debug!("the kernel does not offer FUSE_PARALLEL_DIROPS");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.node(parent).and_then(|p| self.do_lookup(&p, name)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino == INodeNo::ROOT {
            return;
        }
        let mut table = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = table.by_id.get_mut(&ino.0) else { return };
        slot.nlookup = slot.nlookup.saturating_sub(nlookup);
        if slot.nlookup == 0 {
            let key = slot.node.key;
            table.by_id.remove(&ino.0);
            if table.by_key.get(&key) == Some(&ino.0) {
                table.by_key.remove(&key);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| stat_fd(&n.fd)) {
            Ok(st) => reply.attr(&TTL, &attr_of(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| -> FsResult<Stat> {
            let node = self.node(ino)?;
            let file = match fh {
                Some(fh) => self.file(fh).ok(),
                None => None,
            };
            if uid.is_some() || gid.is_some() {
                rfs::chownat(
                    &node.fd,
                    "",
                    uid.map(rfs::Uid::from_raw),
                    gid.map(rfs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)?;
            }
            if let Some(mode) = mode {
                let mode = Mode::from_raw_mode(mode & 0o7777);
                match &file {
                    Some(f) => rfs::fchmod(&**f, mode),
                    None => rfs::chmodat(rfs::CWD, proc_path(&node.fd), mode, AtFlags::empty()),
                }
                .map_err(errno)?;
            }
            if let Some(size) = size {
                match &file {
                    Some(f) => rfs::ftruncate(&**f, size).map_err(errno)?,
                    None => {
                        let f = File::options().write(true).open(proc_path(&node.fd));
                        f.and_then(|f| f.set_len(size)).map_err(io_errno)?
                    }
                }
            }
            if atime.is_some() || mtime.is_some() {
                let times = Timestamps {
                    last_access: atime.map(timespec).unwrap_or(OMIT),
                    last_modification: mtime.map(timespec).unwrap_or(OMIT),
                };
                match &file {
                    Some(f) => rfs::futimens(&**f, &times),
                    None => rfs::utimensat(rfs::CWD, proc_path(&node.fd), &times, AtFlags::empty()),
                }
                .map_err(errno)?;
            }
            stat_fd(&node.fd)
        })();
        match result {
            Ok(st) => reply.attr(&TTL, &attr_of(ino.0, &st)),
            Err(e) => {
                self.count_error();
                reply.error(e)
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).and_then(|n| rfs::readlinkat(&n.fd, "", Vec::new()).map_err(errno)) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.node(parent).and_then(|p| {
            rfs::mknodat(
                &p.fd,
                name,
                rfs::FileType::from_raw_mode(mode),
                Mode::from_raw_mode(mode & 0o7777),
                rdev.into(),
            )
            .map_err(errno)?;
            self.finish_new(req, &p, name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.node(parent).and_then(|p| {
            rfs::mkdirat(&p.fd, name, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
            self.finish_new(req, &p, name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .node(parent)
            .and_then(|p| rfs::unlinkat(&p.fd, name, AtFlags::empty()).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .node(parent)
            .and_then(|p| rfs::unlinkat(&p.fd, name, AtFlags::REMOVEDIR).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.node(parent).and_then(|p| {
            rfs::symlinkat(target, &p.fd, link_name).map_err(errno)?;
            self.finish_new(req, &p, link_name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let (p, np) = (self.node(parent)?, self.node(newparent)?);
            let flags = rfs::RenameFlags::from_bits_retain(flags.bits());
            rfs::renameat_with(&p.fd, name, &np.fd, newname, flags).map_err(errno)
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let (node, np) = (self.node(ino)?, self.node(newparent)?);
            rfs::linkat(rfs::CWD, proc_path(&node.fd), &np.fd, newname, AtFlags::SYMLINK_FOLLOW)
                .map_err(errno)?;
            self.do_lookup(&np, newname)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.node(ino).and_then(|n| {
            rfs::open(proc_path(&n.fd), Self::backing_flags(flags.0), Mode::empty()).map_err(errno)
        });
        match result {
            Ok(fd) => {
                let fh = self.add_handle(Handle::File(Arc::new(File::from(fd))));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result =
            self.file(fh).and_then(|f| read_full_at(&f, size as usize, offset).map_err(io_errno));
        match result {
            Ok(data) => {
                stats::add(&self.counters().reads, 1);
                stats::add(&self.counters().bytes_read, data.len() as u64);
                reply.data(&data)
            }
            Err(e) => {
                self.count_error();
                reply.error(e)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let file = match self.file(fh) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        let len = data.len() as u64;
        self.counters().max_write_request.fetch_max(len, Ordering::Relaxed);
        let delay = self.shared.delays.write_delay(len);
        let shared = self.shared.clone();
        let perform = move |data: &[u8], waited: Duration| {
            let result = write_all_at(&file, data, offset);
            let c = &shared.stats.counters;
            match &result {
                Ok(()) => {
                    stats::add(&c.writes, 1);
                    stats::add(&c.bytes_written, len);
                }
                Err(_) => stats::add(&c.errors, 1),
            }
            if !waited.is_zero() {
                stats::add(&c.delayed_writes, 1);
                stats::add_duration(&c.write_delay_ns, waited);
                c.delayed_end();
            }
            shared.stats.publish();
            match result {
                Ok(()) => reply.written(len as u32),
                Err(e) => reply.error(io_errno(e)),
            }
        };
        if delay.is_zero() {
            perform(data, Duration::ZERO);
        } else {
            // The request buffer is the session thread's: a delayed write takes a copy.
            let copy = data.to_vec();
            self.after(delay, "write", move |waited| perform(&copy, waited));
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called at every close(2); the data is already in the backing file.
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // A delayed operation still holds its own reference to the file.
        self.drop_handle(fh);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(fh) {
            Ok(file) => self.sync(file, datasync, false, reply),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.node(ino).and_then(|n| {
            rfs::open(
                proc_path(&n.fd),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)
        });
        match result {
            Ok(fd) => {
                let handle =
                    Handle::Dir { file: Arc::new(File::from(fd)), entries: Mutex::new(Vec::new()) };
                reply.opened(FileHandle(self.add_handle(handle)), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let handle = match self.handle(fh) {
            Ok(handle) => handle,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir { file, entries } = &*handle else { return reply.error(Errno::ENOTDIR) };
        let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            // A (re)start: take a fresh listing. Later calls continue from this snapshot, the
            // offset of an entry being its index + 1.
            match read_dir(file) {
                Ok(list) => *entries = list,
                Err(e) => return reply.error(e),
            }
        }
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry.ino), i as u64 + 1, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.drop_handle(fh);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.handle(fh).as_deref() {
            Ok(Handle::Dir { file, .. }) => self.sync(file.clone(), datasync, true, reply),
            Ok(Handle::File(_)) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(*e),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let node = self.node(ino).or_else(|_| self.node(INodeNo::ROOT));
        match node.and_then(|n| rfs::fstatvfs(&n.fd).map_err(errno)) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let p = self.node(parent)?;
            // The kernel applied the caller's umask to `mode` already (and this process runs
            // with umask 0), so the backing file gets exactly the mode the caller asked for.
            let exclusive = OFlags::from_bits_retain(flags as u32) & OFlags::EXCL;
            let oflags = Self::backing_flags(flags) | OFlags::CREATE | exclusive;
            let fd = rfs::openat(&p.fd, name, oflags, Mode::from_raw_mode(mode & 0o7777))
                .map_err(errno)?;
            let path_fd = rfs::open(proc_path(&fd), OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
                .map_err(errno)?;
            self.own_new(req, &p, &path_fd)?;
            let st = stat_fd(&path_fd)?;
            let id = self.remember(path_fd, &st);
            let fh = self.add_handle(Handle::File(Arc::new(File::from(fd))));
            Ok((attr_of(id, &st), fh))
        })();
        match result {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // Extended attributes are not passed through. ENOSYS makes the kernel stop asking (it
        // asks for security.capability before every write) and answer EOPNOTSUPP itself.
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // isatty() and the like, on a regular file.
        reply.error(Errno::ENOTTY)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.file(fh).and_then(|f| {
            let flags = rfs::FallocateFlags::from_bits_retain(mode as u32);
            rfs::fallocate(&*f, flags, offset, length).map_err(errno)
        });
        match result {
            Ok(()) => {
                stats::add(&self.counters().fallocates, 1);
                reply.ok()
            }
            Err(e) => {
                self.count_error();
                reply.error(e)
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // The kernel sends only SEEK_DATA (3) and SEEK_HOLE (4); it handles the others.
        let result = self.file(fh).and_then(|f| {
            let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let pos = match whence {
                3 => rfs::SeekFrom::Data(offset),
                4 => rfs::SeekFrom::Hole(offset),
                0 => rfs::SeekFrom::Start(offset),
                _ => return Err(Errno::EINVAL),
            };
            rfs::seek(&*f, pos).map_err(errno)
        });
        match result {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(e),
        }
    }
}

/// All entries of a directory, `.` and `..` included.
fn read_dir(file: &File) -> FsResult<Vec<DirEntry>> {
    let dir = rfs::Dir::read_from(file.as_fd()).map_err(errno)?;
    let mut list = Vec::new();
    for entry in dir {
        let entry = entry.map_err(errno)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
        let kind = match entry.file_type() {
            rfs::FileType::Directory => FileType::Directory,
            rfs::FileType::Symlink => FileType::Symlink,
            rfs::FileType::Fifo => FileType::NamedPipe,
            rfs::FileType::CharacterDevice => FileType::CharDevice,
            rfs::FileType::BlockDevice => FileType::BlockDevice,
            rfs::FileType::Socket => FileType::Socket,
            rfs::FileType::RegularFile => FileType::RegularFile,
            rfs::FileType::Unknown => match rfs::statat(file, &*name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => kind_of(st.st_mode),
                Err(_) => FileType::RegularFile,
            },
        };
        list.push(DirEntry { ino: entry.ino(), kind, name });
    }
    Ok(list)
}
