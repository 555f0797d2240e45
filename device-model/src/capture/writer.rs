//! The session writer: the thread that owns one session's dump file, so that the vfio-user
//! message loop never waits for the host's disk.
//!
//! QEMU's vfio-user client waits at most `x-msg-timeout` (5 s by default) for any answer, then
//! drops the card for the life of that QEMU process. A big VM's final fsync alone can take
//! longer than that on an ordinary disk, so nothing that may wait for the disk runs in the
//! message loop: the card answers every message from memory and hands the disk work here.
//!
//! **One thread per session**, rather than one I/O thread per card: sessions are independent
//! files, and making one durable (fsync, rename, hash, sidecar: minutes on a slow disk) must not
//! hold back the bytes of the next crash, which after a guest reboot can come before the
//! previous dump is durable. The count of writers alive at once is bounded by
//! [`crashmon_card_abi::MAX_FINISHING_SESSIONS`] (the card refuses a session beyond it with
//! `HOST_BUSY`), and each writer owns one slot-sized buffer and a queue with room for one entry
//! per slot plus the close, so memory stays bounded whatever the disk's speed.
//!
//! **Flow control through the slots.** A doorbell claims its slot in the data window and queues
//! a [`WriteJob`]; the writer copies the slot into its own buffer, writes it into the file, and
//! only then releases the slot, which is what lets `COMPLETED` advance. A slow disk therefore
//! slows the guest down (it waits for a free slot), never makes the card block or drop bytes.
//!
//! The writer reports back through [`Progress`] (atomics only): bytes written, whether an I/O
//! error happened, and how the session ended; the card reads it when the guest reads a register.

use super::quota;
use super::{Closing, Finished, Session, SessionName};
use crate::capture::{BugCheckInfo, CaptureConfig};
use crate::data_window::DataWindow;
use crate::events::{DumpFields, Event};
use crashmon_card_abi::ErrorCode;
use crashmon_card_abi::{DumpIoType, SLOT_COUNT, SLOT_SIZE};
use log::{error, warn};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Queue entries: one per slot (a slot is claimed by at most one queued write) and the close.
const QUEUE_DEPTH: usize = SLOT_COUNT as usize + 1;

/// One chunk for the writer: its bytes are in `slot`, which it owns until they are written.
#[derive(Clone, Copy, Debug)]
pub struct WriteJob {
    /// The slot holding the bytes.
    pub slot: u32,
    /// How many bytes (1..=SLOT_SIZE, checked by the card).
    pub len: u32,
    /// What they are.
    pub kind: DumpIoType,
    /// Where they go in the file (already placed within the limits by the card).
    pub start: u64,
    /// Whether the guest gave the offset (rather than Offset -1).
    pub explicit: bool,
    /// The card read the bytes from guest memory into the slot (DMA mode), rather than the
    /// guest storing them there.
    pub dma: bool,
}

enum Job {
    Write(WriteJob),
    Close(Closing),
}

/// How a session ended, as far as the disk is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Still writing, or making the file durable.
    Running = 0,
    /// Durable under its `.dmp` name.
    Complete = 1,
    /// Durable under its `.incomplete.dmp` name.
    Incomplete = 2,
    /// The file could not be created or made durable.
    Failed = 3,
}

/// What a writer tells the card, lock-free.
#[derive(Debug, Default)]
pub struct Progress {
    bytes_written: AtomicU64,
    outcome: AtomicU8,
    /// The first [`ErrorCode`] the writer hit (`HOST_IO` or `QUOTA`), 0 for none.
    error: AtomicU32,
    longest_answer_us: AtomicU64,
}

impl Progress {
    /// Payload bytes written into the file so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Acquire)
    }

    /// How the session ended, or [`Outcome::Running`].
    pub fn outcome(&self) -> Outcome {
        match self.outcome.load(Ordering::Acquire) {
            1 => Outcome::Complete,
            2 => Outcome::Incomplete,
            3 => Outcome::Failed,
            _ => Outcome::Running,
        }
    }

    /// The first error the writer hit: a write (or the file's creation) failed (`HOST_IO`), or
    /// a limit refused the session or stopped the dump (`QUOTA`).
    pub fn error(&self) -> Option<ErrorCode> {
        ErrorCode::from_u32(self.error.load(Ordering::Acquire)).filter(|e| *e != ErrorCode::None)
    }

    /// Records `code` unless an error is already recorded; true if this is the first.
    fn set_error(&self, code: ErrorCode) -> bool {
        self.error.compare_exchange(0, code as u32, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Records how long the message loop took to answer one message while this session was
    /// open or finishing; the longest goes in the sidecar.
    pub fn note_answer_time(&self, us: u64) {
        self.longest_answer_us.fetch_max(us, Ordering::AcqRel);
    }

    fn set_outcome(&self, outcome: Outcome) {
        self.outcome.store(outcome as u8, Ordering::Release);
    }
}

/// The card's handle on an open session's writer.
pub struct SessionWriter {
    name: SessionName,
    jobs: SyncSender<Job>,
    progress: Arc<Progress>,
    thread: JoinHandle<Option<Finished>>,
}

/// A session whose close was queued: its writer is finishing, or has finished.
pub struct FinishingSession {
    /// What the writer reports.
    pub progress: Arc<Progress>,
    thread: JoinHandle<Option<Finished>>,
}

impl SessionWriter {
    /// Starts the writer of a new session. Only the thread is made here; the file is created by
    /// the writer, so this never waits for the disk.
    pub fn spawn(
        config: &CaptureConfig,
        bugcheck: Option<BugCheckInfo>,
        window: Arc<DataWindow>,
    ) -> io::Result<Self> {
        let name = SessionName::new();
        let (jobs, queue) = mpsc::sync_channel(QUEUE_DEPTH);
        let progress = Arc::new(Progress::default());
        let thread = std::thread::Builder::new()
            .name(format!("writer-{}", &name.id.simple().to_string()[..8]))
            .spawn({
                let config = config.clone();
                let name = name.clone();
                let progress = progress.clone();
                move || run(&config, &name, bugcheck, &window, &progress, queue)
            })?;
        Ok(Self { name, jobs, progress, thread })
    }

    /// The session's name.
    pub fn name(&self) -> &SessionName {
        &self.name
    }

    /// What the writer reports.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Queues a chunk whose slot the card has claimed for it. Never blocks; `false` if the
    /// writer cannot take it (its thread is gone), in which case the caller releases the slot.
    pub fn write(&self, job: WriteJob) -> bool {
        match self.jobs.try_send(Job::Write(job)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                // Cannot happen while the card claims a slot per queued write; refusing is the
                // safe answer if it ever did.
                error!("session {}: writer queue full", self.name.id);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues the close after every queued chunk. Never blocks.
    pub fn close(self, closing: Closing) -> FinishingSession {
        if self.jobs.try_send(Job::Close(closing)).is_err() {
            // The queue has room for the close (see QUEUE_DEPTH); a writer that is gone has
            // already ended the session as failed, and dropping the sender below ends it too.
            error!("session {}: could not queue its close", self.name.id);
        }
        FinishingSession { progress: self.progress, thread: self.thread }
    }
}

impl FinishingSession {
    /// Whether the writer thread has ended (its dump is durable, or failed).
    pub fn is_done(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the writer to end and returns what it left on disk.
    pub fn join(self) -> Option<Finished> {
        self.thread.join().unwrap_or_else(|_| {
            error!("a session writer panicked; its partial dump is recovered at the next start");
            None
        })
    }
}

/// Why a job's bytes did not reach the file.
enum JobError {
    /// The bytes could not be had (recorded in the sidecar; the session goes on).
    Lost(&'static str),
    /// The file could not take them (`HOST_IO`).
    Io(io::Error),
}

/// Writes one job's bytes into the dump through `buffer`: the writer's own copy of the slot, so
/// that the zero-page test, the hash and the file all see the same bytes even if the guest
/// changes the slot meanwhile (a guest that does spoils only its own dump, and the sidecar's
/// hash still matches the file).
fn write_job(
    s: &mut Session,
    job: &WriteJob,
    window: &DataWindow,
    buffer: &mut Vec<u8>,
) -> Result<(), JobError> {
    let len = (job.len as usize).min(SLOT_SIZE as usize);
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    let data = &mut buffer[..len];
    window
        .copy_out(job.slot, data)
        .ok_or(JobError::Lost("a chunk named a slot outside the window"))?;
    s.write(job.kind, job.start, job.explicit, data).map_err(JobError::Io)?;
    if job.dma {
        s.note_dma_chunk();
    }
    Ok(())
}

/// How often a streaming session reports its progress as an event.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The writer thread.
fn run(
    config: &CaptureConfig,
    name: &SessionName,
    bugcheck: Option<BugCheckInfo>,
    window: &DataWindow,
    progress: &Progress,
    queue: Receiver<Job>,
) -> Option<Finished> {
    let events = &config.events;
    let session_id = name.id.to_string();
    // An announced crash was reported by the card; otherwise it is reported here, once its code
    // is known from the dump header, or at the close.
    let mut crash_reported = bugcheck.is_some();
    // The limits first: old dumps make room, and a session is refused without a file when the
    // filesystem is already below --min-free.
    let room =
        quota::Room::make(config).and_then(|mut room| Ok((room.check_write(config, 0, 0)?, room)));
    let (mut room, mut stopped) = match room {
        Ok((refusal, room)) => (Some(room), refusal),
        Err(e) => {
            error!("VM {}: cannot check the dump limits: {e}", config.vm_name);
            (None, None)
        }
    };
    let mut session = if let Some(why) = &stopped {
        error!("VM {}: session {} refused, no file made: {why}", config.vm_name, name.id);
        progress.set_error(ErrorCode::Quota);
        events.emit(Event::Quota { limit: "min-free".into(), detail: why.clone() });
        None
    } else {
        match Session::open(config, name, bugcheck) {
            Ok(session) => Some(session),
            Err(e) => {
                error!("VM {}: cannot create a dump file: {e}", config.vm_name);
                progress.set_error(ErrorCode::HostIo);
                None
            }
        }
    };
    // The writer's staging buffer (see `write_job`). It grows to the longest piece seen (at most
    // a slot), so a session of small chunks does not zero a whole slot's worth first.
    let mut buffer = Vec::new();
    let mut last_progress = Instant::now();
    let mut keep_applied = false;
    let closing = loop {
        match queue.recv() {
            Ok(Job::Write(job)) => {
                // The first bytes: this dump will be kept, so --keep makes room for it now.
                if let (Some(s), false) = (&session, keep_applied) {
                    keep_applied = true;
                    if let Err(e) = quota::Room::trim(config, &s.partial_path()) {
                        warn!("VM {}: cannot apply --keep: {e}", config.vm_name);
                    }
                }
                if let (Some(s), Some(room), None) = (&session, &mut room, &stopped) {
                    let len = job.len as u64;
                    let new_size = s.size().max(job.start.saturating_add(len));
                    match room.check_write(config, new_size, len) {
                        Ok(None) => {}
                        Ok(Some(why)) => {
                            error!("VM {}: dump stopped: {why}", config.vm_name);
                            progress.set_error(ErrorCode::Quota);
                            events.emit(Event::Quota { limit: "disk".into(), detail: why.clone() });
                            stopped = Some(why);
                        }
                        Err(e) => error!("VM {}: cannot check free space: {e}", config.vm_name),
                    }
                }
                match session.as_mut() {
                    // A dump the limits stopped takes no more bytes; its slots are still freed.
                    Some(_) if stopped.is_some() => {}
                    Some(s) => match write_job(s, &job, window, &mut buffer) {
                        Ok(()) => {
                            progress.bytes_written.store(s.bytes_received(), Ordering::Release)
                        }
                        Err(JobError::Lost(what)) => s.note_lost(what),
                        Err(JobError::Io(e)) => {
                            // Once per session: a full disk fails every chunk that follows.
                            if progress.set_error(ErrorCode::HostIo) {
                                error!("VM {}: writing the dump failed: {e}", config.vm_name);
                            }
                        }
                    },
                    None => {}
                }
                window.release(job.slot);
                if let Some(s) = &session {
                    if !crash_reported && s.sidecar().bugcheck.is_some() {
                        crash_reported = true;
                        let bugcheck = s.sidecar().bugcheck.as_ref().map(|b| b.fields());
                        events.emit(Event::Bugcheck { session: session_id.clone(), bugcheck });
                    }
                    if last_progress.elapsed() >= PROGRESS_EVERY {
                        last_progress = Instant::now();
                        events.emit(Event::Progress {
                            session: session_id.clone(),
                            bytes_written: s.bytes_received(),
                            chunks: s.sidecar().chunks,
                        });
                    }
                }
            }
            Ok(Job::Close(closing)) => break closing,
            // The card went away without closing (it is only dropped at exit): keep the bytes.
            Err(_) => {
                break Closing {
                    incomplete_reason: Some(
                        "device model stopped while the dump was streaming".into(),
                    ),
                    ..Closing::default()
                }
            }
        }
    };
    let Some(mut session) = session else {
        progress.set_outcome(Outcome::Failed);
        return None;
    };
    // A dump the limits stopped is incomplete, whatever the guest said.
    let mut closing = closing;
    if let Some(why) = stopped {
        closing.incomplete_reason = Some(why);
    }
    let incomplete = closing.incomplete_reason.as_deref();
    if session.is_empty() {
        let why = incomplete.unwrap_or("complete with no bytes");
        log::warn!(
            "VM {}: session {} carried no dump bytes ({why}); no file kept",
            config.vm_name,
            name.id
        );
        events.emit(Event::EmptySession { session: session_id, reason: why.to_owned() });
        if let Err(e) = session.discard() {
            error!("VM {}: removing the empty session's files failed: {e}", config.vm_name);
        }
        progress.set_outcome(if incomplete.is_some() {
            Outcome::Incomplete
        } else {
            Outcome::Complete
        });
        return None;
    }
    if !crash_reported {
        events.emit(Event::Bugcheck { session: session_id.clone(), bugcheck: None });
    }
    if let Err(e) = session.make_durable(incomplete) {
        error!("VM {}: making the dump durable failed: {e}", config.vm_name);
        progress.set_outcome(Outcome::Failed);
        return None;
    }
    // The dump is durable under its final name: the card may now say COMPLETE, while the hash
    // and the final sidecar are still being written.
    progress.set_outcome(if incomplete.is_some() {
        Outcome::Incomplete
    } else {
        Outcome::Complete
    });
    let longest = progress.longest_answer_us.load(Ordering::Acquire);
    match session.finish(&closing, Some(longest)) {
        Ok(finished) => {
            if let Err(e) = quota::Room::trim(config, &finished.dump_path) {
                warn!("VM {}: cannot apply --keep after closing a dump: {e}", config.vm_name);
            }
            let sc = &finished.sidecar;
            let dump = DumpFields {
                dump: finished.dump_path.clone(),
                sidecar: finished.sidecar_path.clone(),
                size: sc.size,
                bytes_received: sc.bytes_received,
                sha256: sc.sha256.clone(),
                bugcheck: sc.bugcheck.as_ref().map(|b| b.fields()),
            };
            if sc.rejected_chunks > 0 {
                events.emit(Event::ChunkRefused {
                    code: "summary".into(),
                    detail: format!(
                        "{} doorbells refused in session {session_id}; the first: {}",
                        sc.rejected_chunks,
                        sc.first_error.as_deref().unwrap_or("?")
                    ),
                });
            }
            events.emit(match closing.incomplete_reason {
                None => Event::Complete { session: session_id, dump },
                Some(reason) => Event::Incomplete { session: session_id, reason, dump },
            });
            Some(finished)
        }
        Err(e) => {
            error!("VM {}: writing the final sidecar failed: {e}", config.vm_name);
            None
        }
    }
}
