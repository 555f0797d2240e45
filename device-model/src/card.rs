//! The crash-monitor card's behaviour: the BAR0 register file and the session state machine.
//!
//! Register offsets, bits, states and error codes come from `crashmon-card-abi`, the datasheet
//! shared with the guest driver. Everything here is driven by guest writes, so every value is
//! checked and a bad one becomes an error code in the register file, never a panic, a write
//! outside the session's file, or a file past the maximum size.
//!
//! Nothing here waits for the disk: this code runs in the vfio-user message loop, which must
//! answer QEMU within its `x-msg-timeout`. An open session is a [`SessionWriter`] (its own
//! thread owns the file); a doorbell claims its slot and queues the chunk, and the register file
//! reads the writers' [`Progress`] from memory.

use crate::capture::quota::SessionRate;
use crate::capture::writer::{FinishingSession, Outcome, Progress, SessionWriter, WriteJob};
use crate::capture::{
    BugCheckInfo, BugCheckSource, CaptureConfig, ChunkError, Closing, Finished, Placement,
};
use crate::data_window::{DataWindow, SlotOwner};
use crate::dma::{DmaError, DmaPiece, GuestMemory};
use crate::events::Event;
use crashmon_card_abi::{
    self as abi, cap, chunk_flags, control, regs, status, DmaRange, DumpIoType, ErrorCode,
    SessionState,
};
use log::{debug, error, info, warn};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Closed sessions whose results the card keeps (for tests and logs); older ones are dropped so
/// that a guest opening sessions in a loop cannot grow the host's memory.
const FINISHED_KEPT: usize = 16;

/// Doorbells refused since the card was armed: they go in the sidecar of the session that follows.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    first: Option<String>,
}

/// A session that is open: its writer, where its next sequential chunk goes, and what the card
/// refused since it was armed.
struct OpenSession {
    /// Which session of the card this is (1 for the first).
    ordinal: u64,
    writer: SessionWriter,
    placement: Placement,
    /// Whether a chunk has arrived (`STREAMING`) or only the announcement (`BUGCHECK_ANNOUNCED`).
    streaming: bool,
    refusals: Refusals,
}

/// The session state machine of the datasheet; each state owns what only it needs.
enum CardState {
    Idle,
    Armed(Refusals),
    /// `BUGCHECK_ANNOUNCED` or `STREAMING`.
    Open(Box<OpenSession>),
    /// The complete doorbell came; the writer is making the dump durable.
    Finishing(Arc<Progress>),
    Complete,
    Aborted,
}

impl CardState {
    fn abi(&self) -> SessionState {
        match self {
            Self::Idle => SessionState::Idle,
            Self::Armed(_) => SessionState::Armed,
            Self::Open(s) if s.streaming => SessionState::Streaming,
            Self::Open(_) => SessionState::BugCheckAnnounced,
            Self::Finishing(_) => SessionState::Finishing,
            Self::Complete => SessionState::Complete,
            Self::Aborted => SessionState::Aborted,
        }
    }
}

/// The chunk descriptor registers.
#[derive(Clone, Copy, Debug, Default)]
struct Chunk {
    offset: u64,
    length: u32,
    kind: u32,
    slot: u32,
    flags: u32,
    ranges: u32,
}

/// The card: register file, session state, and the writers of sessions still being finished.
pub struct CrashMonitorCard {
    capture: CaptureConfig,
    window: Arc<DataWindow>,
    state: CardState,
    error: ErrorCode,
    /// Resets so far: slots claimed before the last reset belong to an older epoch.
    epoch: u32,
    /// Doorbells rung since the last reset.
    rung: u32,
    bugcheck_code: u32,
    bugcheck_params: [u64; 4],
    chunk: Chunk,
    /// The guest memory QEMU mapped for DMA mode.
    dma: GuestMemory,
    dma_probe_addr: u64,
    /// What the last `DMA_PROBE` read.
    dma_probe_data: [u8; abi::DMA_PROBE_SIZE],
    /// The latest session (open or finishing): BYTES_WRITTEN and I/O errors come from it.
    current: Option<Arc<Progress>>,
    /// Writers whose close is queued, until they end, with the order their sessions opened in.
    finishing: Vec<(u64, FinishingSession)>,
    /// Sessions opened since the card was made.
    opened: u64,
    /// What the last `FINISHED_KEPT` writers left on disk, by the order their sessions opened in.
    finished: BTreeMap<u64, Finished>,
    /// Sessions opened lately, for `--max-sessions-per-hour`.
    rate: SessionRate,
    /// Whether a session refused as HOST_BUSY was already reported.
    busy_reported: bool,
    clock: Instant,
}

impl CrashMonitorCard {
    /// A card in its power-on state.
    pub fn new(capture: CaptureConfig, window: DataWindow) -> Self {
        Self {
            capture,
            window: Arc::new(window),
            state: CardState::Idle,
            error: ErrorCode::None,
            epoch: 0,
            rung: 0,
            bugcheck_code: 0,
            bugcheck_params: [0; 4],
            chunk: Chunk::default(),
            dma: GuestMemory::default(),
            dma_probe_addr: 0,
            dma_probe_data: [0; abi::DMA_PROBE_SIZE],
            current: None,
            finishing: Vec::new(),
            opened: 0,
            finished: BTreeMap::new(),
            rate: SessionRate::default(),
            busy_reported: false,
            clock: Instant::now(),
        }
    }

    /// The data window behind BAR2.
    pub fn window(&self) -> &DataWindow {
        &self.window
    }

    /// `DMA_MAP` from QEMU: guest memory the card may read in DMA mode.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        file: Option<std::fs::File>,
        readable: bool,
    ) -> Result<(), DmaError> {
        self.dma.map(iova, size, offset, file, readable)
    }

    /// `DMA_UNMAP` from QEMU. Chunks already accepted keep reading what they resolved.
    pub fn dma_unmap(&mut self, iova: u64, size: u64, all: bool) -> Result<(), DmaError> {
        self.dma.unmap(iova, size, all)
    }

    /// The session state, as `STATUS` shows it.
    pub fn state(&mut self) -> SessionState {
        self.settle();
        self.state.abi()
    }

    /// The most recent sessions whose writers have ended, in the order they opened (at most
    /// `FINISHED_KEPT`). Writers still running are not waited for; see [`Self::wait_writers`].
    pub fn finished(&mut self) -> Vec<Finished> {
        self.reap(false);
        self.finished.values().cloned().collect()
    }

    /// Waits for every session writer whose close is queued (the open session, if any, is left
    /// alone), then returns [`Self::finished`]. For shutdown and tests: never called from the
    /// message loop.
    pub fn wait_writers(&mut self) -> Vec<Finished> {
        self.reap(true);
        self.finished.values().cloned().collect()
    }

    /// The events handle, to flush at exit.
    pub fn events(&self) -> crate::events::Events {
        self.capture.events.clone()
    }

    /// Takes the writers whose close is queued, to be joined without holding the card.
    pub fn take_writers(&mut self) -> Vec<FinishingSession> {
        std::mem::take(&mut self.finishing).into_iter().map(|(_, w)| w).collect()
    }

    /// Sessions opened since the card was made (a test's or a fuzzer's model of the card uses it
    /// to tell which session a chunk went to).
    pub fn sessions_opened(&self) -> u64 {
        self.opened
    }

    /// Records how long one vfio-user message took to answer, for the current session's sidecar.
    pub fn note_answer_time(&self, elapsed: Duration) {
        if let Some(p) = &self.current {
            p.note_answer_time(elapsed.as_micros().min(u64::MAX as u128) as u64);
        }
    }

    /// A BAR0 read of 4 bytes, or 8 bytes at a `_LO` register. A read of any other width reads
    /// as zeros, except that one wider than 8 bytes is refused without touching `data`: a
    /// vfio-user client may ask for 4 GiB in one message, and zeroing that would commit it.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() > 8 {
            self.refuse_access(offset);
            return;
        }
        data.fill(0);
        self.settle();
        match (data.len(), offset) {
            (4, o) if o % 4 == 0 => {
                let v = self.read_reg(o).unwrap_or_else(|| self.refuse_access(o));
                data.copy_from_slice(&v.to_le_bytes());
            }
            (8, o) if is_wide(o) => {
                let lo = self.read_reg(o).unwrap_or(0);
                let hi = self.read_reg(o + 4).unwrap_or(0);
                data.copy_from_slice(&((hi as u64) << 32 | lo as u64).to_le_bytes());
            }
            _ => {
                self.refuse_access(offset);
            }
        }
    }

    /// A BAR0 write of 4 bytes, or 8 bytes at a `_LO` register (acting as `_LO` then `_HI`).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.settle();
        match (data.len(), offset) {
            (4, o) if o % 4 == 0 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.write_reg(o, v);
            }
            (8, o) if is_wide(o) => {
                let v = u64::from_le_bytes(data.try_into().unwrap_or_default());
                self.write_reg(o, v as u32);
                self.write_reg(o + 4, (v >> 32) as u32);
            }
            _ => {
                self.refuse_access(offset);
            }
        }
    }

    /// A reset from the bus (vfio-user `DEVICE_RESET`, which QEMU sends on a VM reset): like
    /// `CONTROL.RESET`, and the open session is kept as incomplete.
    pub fn bus_reset(&mut self) {
        self.reset("VM reset while the dump was streaming");
    }

    /// The VM went away (QEMU exited or the connection broke).
    pub fn disconnect(&mut self) {
        self.reset("VM disconnected while the dump was streaming");
        // The next client's memory is its own: its mappings come with it.
        self.dma = GuestMemory::default();
    }

    /// The device model is stopping: the open session is closed as incomplete. Its writer and
    /// every finishing one go on; join them with [`Self::take_writers`].
    pub fn shutdown(&mut self, why: &str) {
        self.reset(why);
    }

    /// Folds what the writers reported into the register file: a finishing session that became
    /// durable shows `COMPLETE` (or `ABORTED` with `HOST_IO` if it could not), and an I/O error
    /// of the current session latches `HOST_IO`.
    fn settle(&mut self) {
        if let CardState::Finishing(progress) = &self.state {
            match progress.outcome() {
                Outcome::Running => {}
                Outcome::Complete => self.state = CardState::Complete,
                Outcome::Incomplete | Outcome::Failed => {
                    let code = progress.error().unwrap_or(ErrorCode::HostIo);
                    self.state = CardState::Aborted;
                    self.latch(code);
                }
            }
        }
        if let Some(code) = self.current.as_ref().and_then(|p| p.error()) {
            self.latch(code);
        }
        self.reap(false);
    }

    /// Collects writers that have ended (all of them, waiting, when `wait`).
    fn reap(&mut self, wait: bool) {
        let mut i = 0;
        while i < self.finishing.len() {
            if wait || self.finishing[i].1.is_done() {
                let (ordinal, writer) = self.finishing.swap_remove(i);
                if let Some(f) = writer.join() {
                    self.finished.insert(ordinal, f);
                    if self.finished.len() > FINISHED_KEPT {
                        self.finished.pop_first();
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    fn completed(&self) -> u32 {
        self.window.oldest_pending(self.epoch, self.rung).unwrap_or(self.rung)
    }

    fn bytes_written(&self) -> u64 {
        self.current.as_ref().map_or(0, |p| p.bytes_written())
    }

    fn read_reg(&self, offset: u64) -> Option<u32> {
        let p = |n: usize, hi: bool| (self.bugcheck_params[n] >> if hi { 32 } else { 0 }) as u32;
        Some(match u32::try_from(offset).ok()? {
            regs::MAGIC => abi::MAGIC_VALUE,
            regs::VERSION => abi::ABI_VERSION,
            regs::CAPABILITIES => cap::ALL,
            regs::SLOT_COUNT => abi::SLOT_COUNT,
            regs::SLOT_SIZE => abi::SLOT_SIZE,
            regs::MAX_DUMP_SIZE_LO => self.capture.max_dump_size as u32,
            regs::MAX_DUMP_SIZE_HI => (self.capture.max_dump_size >> 32) as u32,
            regs::STATUS => {
                let error = if self.error == ErrorCode::None { 0 } else { status::ERROR };
                self.state.abi() as u32 | status::READY | error
            }
            regs::ERROR => self.error as u32,
            regs::COMPLETED => self.completed(),
            regs::BUGCHECK_CODE => self.bugcheck_code,
            o @ regs::BUGCHECK_PARAM1_LO..=regs::BUGCHECK_PARAM4_HI => {
                let i = (o - regs::BUGCHECK_PARAM1_LO) / 4;
                p(i as usize / 2, i % 2 == 1)
            }
            regs::CHUNK_OFFSET_LO => self.chunk.offset as u32,
            regs::CHUNK_OFFSET_HI => (self.chunk.offset >> 32) as u32,
            regs::CHUNK_LENGTH => self.chunk.length,
            regs::CHUNK_TYPE => self.chunk.kind,
            regs::CHUNK_SLOT => self.chunk.slot,
            regs::BYTES_WRITTEN_LO => self.bytes_written() as u32,
            regs::BYTES_WRITTEN_HI => (self.bytes_written() >> 32) as u32,
            // Wraps after 49 days; the driver only ever looks at differences.
            regs::HOST_CLOCK_MS => self.clock.elapsed().as_millis() as u32,
            regs::CHUNK_FLAGS => self.chunk.flags,
            regs::CHUNK_RANGES => self.chunk.ranges,
            regs::DMA_PROBE_ADDR_LO => self.dma_probe_addr as u32,
            regs::DMA_PROBE_ADDR_HI => (self.dma_probe_addr >> 32) as u32,
            o @ regs::DMA_PROBE_DATA..regs::DMA_PROBE_DATA_END if o % 4 == 0 => {
                let at = (o - regs::DMA_PROBE_DATA) as usize;
                let b = self.dma_probe_data.get(at..at + 4)?;
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            _ => return None,
        })
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let set_lo = |r: &mut u64, v: u32| *r = (*r & !0xFFFF_FFFF) | v as u64;
        let set_hi = |r: &mut u64, v: u32| *r = (*r & 0xFFFF_FFFF) | (v as u64) << 32;
        match u32::try_from(offset).unwrap_or(u32::MAX) {
            regs::CONTROL => self.control(v),
            regs::BUGCHECK_CODE => self.bugcheck_code = v,
            o @ regs::BUGCHECK_PARAM1_LO..=regs::BUGCHECK_PARAM4_HI => {
                let i = ((o - regs::BUGCHECK_PARAM1_LO) / 4) as usize;
                let param = &mut self.bugcheck_params[i / 2];
                if i.is_multiple_of(2) {
                    set_lo(param, v)
                } else {
                    set_hi(param, v)
                }
            }
            regs::CHUNK_OFFSET_LO => set_lo(&mut self.chunk.offset, v),
            regs::CHUNK_OFFSET_HI => set_hi(&mut self.chunk.offset, v),
            regs::CHUNK_LENGTH => self.chunk.length = v,
            regs::CHUNK_TYPE => self.chunk.kind = v,
            regs::CHUNK_SLOT => self.chunk.slot = v,
            regs::CHUNK_FLAGS => self.chunk.flags = v,
            regs::CHUNK_RANGES => self.chunk.ranges = v,
            regs::DMA_PROBE_ADDR_LO => set_lo(&mut self.dma_probe_addr, v),
            regs::DMA_PROBE_ADDR_HI => set_hi(&mut self.dma_probe_addr, v),
            regs::DOORBELL => {
                let seq = self.rung;
                self.rung = self.rung.wrapping_add(1);
                if let Err(code) = self.doorbell(seq) {
                    self.refuse(code, "doorbell");
                }
            }
            _ => {
                self.refuse_access(offset);
            }
        }
    }

    fn control(&mut self, v: u32) {
        if v & !control::ALL != 0 {
            return self.refuse(ErrorCode::BadCommand, "control");
        }
        if v & control::RESET != 0 {
            self.reset("reset by the guest driver while the dump was streaming");
        }
        if v & control::CLEAR_ERROR != 0 {
            self.error = ErrorCode::None;
        }
        if v & control::ARM != 0 {
            match self.state {
                CardState::Open(_) => self.refuse(ErrorCode::BadState, "arm"),
                _ => {
                    if !matches!(self.state, CardState::Armed(_)) {
                        info!("VM {}: the guest's driver armed the card", self.capture.vm_name);
                        self.capture.events.emit(Event::Armed);
                    }
                    // A finishing session goes on: its writer owns it, and its errors are no
                    // longer this card's to report.
                    self.state = CardState::Armed(Refusals::default());
                    self.error = ErrorCode::None;
                    self.current = None;
                }
            }
        }
        if v & control::ANNOUNCE != 0 {
            if !matches!(self.state, CardState::Armed(_)) {
                self.refuse(ErrorCode::BadState, "announce");
            } else {
                let info = BugCheckInfo::new(
                    self.bugcheck_code,
                    self.bugcheck_params,
                    BugCheckSource::Announced,
                );
                let fields = info.fields();
                match self.open_session(Some(info)) {
                    Ok(session) => {
                        // Once a session is open: a refused announcement is the limits' to log.
                        let [p1, p2, p3, p4] = self.bugcheck_params;
                        warn!(
                            "VM {} bug checked: {:#010x} ({p1:#x}, {p2:#x}, {p3:#x}, {p4:#x})",
                            self.capture.vm_name, self.bugcheck_code
                        );
                        self.capture.events.emit(Event::Bugcheck {
                            session: session.to_string(),
                            bugcheck: Some(fields),
                        })
                    }
                    Err(code) => self.refuse(code, "announce"),
                }
            }
        }
        if v & control::ABORT != 0
            && self.close_session(Some("aborted by the guest driver")).is_some()
        {
            self.state = CardState::Aborted;
        }
        if v & control::DMA_PROBE != 0 {
            // 64 bytes of guest RAM through the page cache: no disk, answered at once.
            self.dma_probe_data = [0; abi::DMA_PROBE_SIZE];
            let mut data = [0; abi::DMA_PROBE_SIZE];
            match self.dma.read(self.dma_probe_addr, &mut data) {
                Ok(()) => {
                    self.dma_probe_data = data;
                    debug!(
                        "VM {}: DMA probe at {:#x} read",
                        self.capture.vm_name, self.dma_probe_addr
                    );
                }
                Err(e) => {
                    info!(
                        "VM {}: DMA probe refused ({e}); the driver stays in copy mode",
                        self.capture.vm_name
                    );
                    self.refuse(ErrorCode::BadDma, "dma probe");
                }
            }
        }
    }

    /// Reads and checks a DMA chunk's scatter list from its slot, and resolves every range to
    /// guest memory, as the doorbell rings: a list the guest changes afterwards changes nothing.
    fn dma_pieces(&self, chunk: &Chunk) -> Result<Vec<DmaPiece>, ErrorCode> {
        if chunk.ranges == 0 || chunk.ranges > abi::MAX_DMA_RANGES || chunk.length == 0 {
            return Err(ErrorCode::BadLength);
        }
        let mut list = vec![0u8; chunk.ranges as usize * DmaRange::SIZE];
        self.window
            .read(chunk.slot as u64 * abi::SLOT_SIZE as u64, &mut list)
            .ok_or(ErrorCode::BadSlot)?;
        let mut pieces = Vec::new();
        let mut total = 0u64;
        for entry in list.chunks_exact(DmaRange::SIZE) {
            let range = DmaRange::from_bytes(entry.try_into().map_err(|_| ErrorCode::BadDma)?);
            if range.length == 0 || range.reserved != 0 {
                return Err(ErrorCode::BadDma);
            }
            total += range.length as u64;
            if total > chunk.length as u64 {
                return Err(ErrorCode::BadLength);
            }
            self.dma
                .resolve(range.address, range.length, &mut pieces)
                .map_err(|_| ErrorCode::BadDma)?;
        }
        if total != chunk.length as u64 {
            return Err(ErrorCode::BadLength);
        }
        Ok(pieces)
    }

    /// Acts on the chunk described by the CHUNK_* registers: doorbell number `seq` since reset.
    fn doorbell(&mut self, seq: u32) -> Result<(), ErrorCode> {
        if !matches!(self.state, CardState::Armed(_) | CardState::Open(_)) {
            return Err(ErrorCode::BadState);
        }
        let chunk = self.chunk;
        let kind = DumpIoType::from_u32(chunk.kind)
            .filter(|t| *t != DumpIoType::Invalid)
            .ok_or(ErrorCode::BadType)?;
        if kind == DumpIoType::Complete {
            if chunk.length != 0 {
                return Err(ErrorCode::BadLength);
            }
            let Some(progress) = self.close_session(None) else {
                return Err(ErrorCode::BadState);
            };
            self.state = CardState::Finishing(progress);
            return Ok(());
        }
        if chunk.slot >= abi::SLOT_COUNT {
            return Err(ErrorCode::BadSlot);
        }
        if chunk.flags & !chunk_flags::ALL != 0 {
            return Err(ErrorCode::BadDma);
        }
        let dma = chunk.flags & chunk_flags::DMA != 0;
        let len = chunk.length as usize;
        if len == 0 || len > abi::SLOT_SIZE as usize {
            return Err(ErrorCode::BadLength);
        }
        if self.window.is_owned(chunk.slot) {
            return Err(ErrorCode::SlotBusy);
        }
        if dma {
            // DMA: the guest's bytes go into the slot now, over the list they were described
            // by, and from here on the chunk is like any other. The guest has its buffer back
            // as soon as any register read after the doorbell returns (writes are posted, and a
            // read waits for them). Guest RAM is memory (a memfd), so this reads no disk.
            let pieces = self.dma_pieces(&chunk)?;
            let mut at = 0;
            for piece in &pieces {
                piece.read_into(&self.window, chunk.slot, at).map_err(|e| {
                    warn!("VM {}: DMA read of guest memory failed: {e}", self.capture.vm_name);
                    ErrorCode::BadDma
                })?;
                at += piece.len();
            }
        }
        let explicit = chunk.offset != abi::OFFSET_SEQUENTIAL;
        let max = self.capture.max_dump_size;
        // Placed before a session is opened for it, so a bad first chunk opens no file.
        let mut placement = match &self.state {
            CardState::Open(s) => s.placement,
            _ => Placement::default(),
        };
        let start =
            placement.place(explicit.then_some(chunk.offset), len, max).map_err(|e| match e {
                ChunkError::Overflow { .. } => ErrorCode::BadOffset,
                ChunkError::TooLarge { .. } => ErrorCode::TooLarge,
            })?;
        if !matches!(self.state, CardState::Open(_)) {
            warn!("VM {} is streaming a dump (not announced)", self.capture.vm_name);
            self.open_session(None)?;
        }
        let CardState::Open(session) = &mut self.state else {
            return Err(ErrorCode::BadState);
        };
        if !self.window.claim(chunk.slot, SlotOwner { epoch: self.epoch, seq }) {
            return Err(ErrorCode::SlotBusy);
        }
        let job = WriteJob { slot: chunk.slot, len: chunk.length, kind, start, explicit, dma };
        if !session.writer.write(job) {
            self.window.release(chunk.slot);
            return Err(ErrorCode::HostIo);
        }
        session.placement = placement;
        session.streaming = true;
        Ok(())
    }

    /// Opens a session: starts its writer (which creates the file), unless too many earlier
    /// sessions are still being made durable or the VM opened too many lately. Returns the
    /// session's id.
    fn open_session(&mut self, bugcheck: Option<BugCheckInfo>) -> Result<Uuid, ErrorCode> {
        self.reap(false);
        if self.finishing.len() >= abi::MAX_FINISHING_SESSIONS {
            if !self.busy_reported {
                // Once until a session opens again, however often the guest retries.
                self.busy_reported = true;
                let detail = format!(
                    "{} earlier dumps are still being made durable; new sessions wait",
                    self.finishing.len()
                );
                warn!("VM {}: {detail}", self.capture.vm_name);
                self.capture
                    .events
                    .emit(Event::Quota { limit: "finishing-sessions".into(), detail });
            }
            return Err(ErrorCode::HostBusy);
        }
        self.busy_reported = false;
        // Counted only once the session can open: a busy refusal does not use up the rate.
        let per_hour = self.capture.limits.max_sessions_per_hour;
        if let Err(refused) = self.rate.allow(per_hour, Instant::now()) {
            if refused == 1 {
                // Once per burst: a guest faking crashes in a loop gets one line, not thousands.
                let detail = format!(
                    "more than {per_hour} sessions in the last hour; new sessions are refused"
                );
                warn!("VM {}: {detail}", self.capture.vm_name);
                self.capture
                    .events
                    .emit(Event::Quota { limit: "sessions-per-hour".into(), detail });
            }
            return Err(ErrorCode::Quota);
        }
        match SessionWriter::spawn(&self.capture, bugcheck, self.window.clone()) {
            Ok(writer) => {
                let id = writer.name().id;
                debug!("VM {}: session {id} opening", self.capture.vm_name);
                self.current = Some(writer.progress().clone());
                self.opened += 1;
                let refusals = match &mut self.state {
                    CardState::Armed(r) => std::mem::take(r),
                    _ => Refusals::default(),
                };
                self.state = CardState::Open(Box::new(OpenSession {
                    ordinal: self.opened,
                    writer,
                    placement: Placement::default(),
                    streaming: false,
                    refusals,
                }));
                Ok(id)
            }
            Err(e) => {
                error!("VM {}: cannot start a session writer: {e}", self.capture.vm_name);
                Err(ErrorCode::HostIo)
            }
        }
    }

    /// Queues the close of the open session, if any (complete when `incomplete` is `None`), and
    /// leaves the card `ARMED` meanwhile; the caller sets the state that follows. Returns what
    /// the session's writer reports.
    fn close_session(&mut self, incomplete: Option<&str>) -> Option<Arc<Progress>> {
        let CardState::Open(_) = self.state else { return None };
        let CardState::Open(session) =
            std::mem::replace(&mut self.state, CardState::Armed(Refusals::default()))
        else {
            return None;
        };
        let session = *session;
        let finishing = session.writer.close(Closing {
            incomplete_reason: incomplete.map(str::to_owned),
            rejected_chunks: session.refusals.count,
            first_error: session.refusals.first,
        });
        let progress = finishing.progress.clone();
        self.finishing.push((session.ordinal, finishing));
        Some(progress)
    }

    fn reset(&mut self, why: &str) {
        self.close_session(Some(why));
        // A finishing session is not touched: its writer finishes it as complete.
        self.state = CardState::Idle;
        self.error = ErrorCode::None;
        // Slots still owned by the old session's writer stay busy, but no longer hold back
        // COMPLETED, which restarts at 0.
        self.epoch = self.epoch.wrapping_add(1);
        self.rung = 0;
        self.bugcheck_code = 0;
        self.bugcheck_params = [0; 4];
        self.chunk = Chunk::default();
        self.current = None;
    }

    fn latch(&mut self, code: ErrorCode) {
        if self.error == ErrorCode::None {
            self.error = code;
        }
    }

    fn refuse(&mut self, code: ErrorCode, what: &str) {
        let c = self.chunk;
        let detail = format!(
            "{}: {what} in state {:?} (offset {:#x}, length {}, type {}, slot {})",
            code.name(),
            self.state.abi(),
            c.offset,
            c.length,
            c.kind,
            c.slot
        );
        debug!("VM {}: refused {detail}", self.capture.vm_name);
        let refusals = match &mut self.state {
            CardState::Open(s) => Some(&mut s.refusals),
            CardState::Armed(r) => Some(r),
            _ => None,
        };
        if let Some(r) = refusals {
            r.count += 1;
            if r.first.is_none() {
                // The first refusal since the card was armed is an event; the rest are counted
                // in the sidecar, so a misbehaving guest cannot flood the events.
                r.first = Some(detail.clone());
                self.capture.events.emit(Event::ChunkRefused { code: code.name().into(), detail });
            }
        }
        self.latch(code);
    }

    fn refuse_access(&mut self, offset: u64) -> u32 {
        debug!("VM {}: bad register access at {offset:#x}", self.capture.vm_name);
        self.latch(ErrorCode::BadAccess);
        0
    }
}

/// Whether `offset` is the `_LO` half of a 64-bit register, where 8-byte accesses are allowed.
fn is_wide(offset: u64) -> bool {
    matches!(
        u32::try_from(offset),
        Ok(regs::MAX_DUMP_SIZE_LO
            | regs::BUGCHECK_PARAM1_LO
            | regs::BUGCHECK_PARAM2_LO
            | regs::BUGCHECK_PARAM3_LO
            | regs::BUGCHECK_PARAM4_LO
            | regs::CHUNK_OFFSET_LO
            | regs::BYTES_WRITTEN_LO
            | regs::DMA_PROBE_ADDR_LO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{DumpState, HashSource, Sidecar};
    use std::path::Path;

    struct Rig {
        card: CrashMonitorCard,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new(max: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let config = CaptureConfig::new(dir.path().to_owned(), "t", max);
            Self { card: CrashMonitorCard::new(config, DataWindow::new().unwrap()), _dir: dir }
        }
        fn dir(&self) -> &Path {
            self._dir.path()
        }
        fn r(&mut self, reg: u32) -> u32 {
            let mut b = [0; 4];
            self.card.read(reg as u64, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, reg: u32, v: u32) {
            self.card.write(reg as u64, &v.to_le_bytes());
        }
        fn state(&mut self) -> SessionState {
            SessionState::from_status(self.r(regs::STATUS)).unwrap()
        }
        fn error(&mut self) -> ErrorCode {
            ErrorCode::from_u32(self.r(regs::ERROR)).unwrap()
        }
        /// Waits, as a driver does, until the writer has released `slot`.
        fn wait_slot(&mut self, slot: u32) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.card.window().is_owned(slot) {
                assert!(Instant::now() < deadline, "slot {slot} never freed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        /// Puts `data` in `slot` (once the writer is done with it) and rings the doorbell.
        fn chunk(&mut self, slot: u32, kind: DumpIoType, offset: u64, data: &[u8]) {
            if slot < abi::SLOT_COUNT {
                self.wait_slot(slot);
            }
            self.card.window().write(slot as u64 * abi::SLOT_SIZE as u64, data).unwrap();
            self.card.write(regs::CHUNK_OFFSET_LO as u64, &offset.to_le_bytes());
            self.w(regs::CHUNK_LENGTH, data.len() as u32);
            self.w(regs::CHUNK_TYPE, kind as u32);
            self.w(regs::CHUNK_SLOT, slot);
            self.w(regs::DOORBELL, 1);
        }
        fn complete(&mut self) {
            self.w(regs::CHUNK_LENGTH, 0);
            self.w(regs::CHUNK_TYPE, DumpIoType::Complete as u32);
            self.w(regs::DOORBELL, 1);
        }
        /// Waits for every queued close, as the shutdown path does.
        fn settle(&mut self) {
            self.card.wait_writers();
        }
        fn sidecar(&mut self, i: usize) -> Sidecar {
            let f = &self.card.wait_writers()[i];
            serde_json::from_slice(&std::fs::read(&f.sidecar_path).unwrap()).unwrap()
        }
    }

    #[test]
    fn identity_registers() {
        let mut rig = Rig::new(1 << 40);
        assert_eq!(rig.r(regs::MAGIC), abi::MAGIC_VALUE);
        assert_eq!(rig.r(regs::VERSION), abi::ABI_VERSION);
        assert_eq!(rig.r(regs::SLOT_COUNT), abi::SLOT_COUNT);
        assert_eq!(rig.r(regs::SLOT_SIZE), abi::SLOT_SIZE);
        assert_eq!(rig.r(regs::MAX_DUMP_SIZE_HI), 1 << 8);
        let mut wide = [0u8; 8];
        rig.card.read(regs::MAX_DUMP_SIZE_LO as u64, &mut wide);
        assert_eq!(u64::from_le_bytes(wide), 1 << 40);
        assert_eq!(rig.state(), SessionState::Idle);
        assert_ne!(rig.r(regs::STATUS) & status::READY, 0);
        assert_eq!(rig.error(), ErrorCode::None);
    }

    #[test]
    fn full_session_announced_then_streamed() {
        let mut rig = Rig::new(1 << 30);
        rig.w(regs::CONTROL, control::ARM);
        assert_eq!(rig.state(), SessionState::Armed);
        rig.w(regs::BUGCHECK_CODE, 0x80);
        rig.card.write(regs::BUGCHECK_PARAM1_LO as u64, &0x1122_3344_5566_7788u64.to_le_bytes());
        rig.w(regs::BUGCHECK_PARAM4_HI, 0xdead);
        rig.w(regs::CONTROL, control::ANNOUNCE);
        assert_eq!(rig.state(), SessionState::BugCheckAnnounced);
        rig.chunk(0, DumpIoType::Header, abi::OFFSET_SEQUENTIAL, &[1; 100]);
        rig.chunk(1, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, &[2; 200]);
        rig.chunk(2, DumpIoType::SecondaryData, abi::OFFSET_SEQUENTIAL, &[3; 50]);
        assert_eq!(rig.state(), SessionState::Streaming);
        for slot in 0..3 {
            rig.wait_slot(slot);
        }
        assert_eq!(rig.r(regs::COMPLETED), 3);
        assert_eq!(rig.r(regs::BYTES_WRITTEN_LO), 350);
        rig.complete();
        assert!(
            matches!(rig.state(), SessionState::Finishing | SessionState::Complete),
            "the complete doorbell is answered at once"
        );
        rig.settle();
        assert_eq!(rig.state(), SessionState::Complete);
        assert_eq!(rig.error(), ErrorCode::None);
        let sc = rig.sidecar(0);
        assert_eq!(sc.state, DumpState::Complete);
        let bc = sc.bugcheck.unwrap();
        assert_eq!(bc.code, "0x00000080");
        assert_eq!(bc.parameters[0], "0x1122334455667788");
        assert_eq!(bc.parameters[3], "0x0000dead00000000");
        assert_eq!(
            (sc.bytes_by_type.header, sc.bytes_by_type.body, sc.bytes_by_type.secondary_data),
            (100, 200, 50)
        );
        let data = std::fs::read(&rig.card.finished()[0].dump_path).unwrap();
        assert_eq!(data.len(), 350);
        assert!(data[..100].iter().all(|&b| b == 1) && data[300..].iter().all(|&b| b == 3));
    }

    /// Guest "RAM" for DMA tests: 64 KiB at guest-physical 0x10_0000, byte i = i * 7 + 1.
    fn guest_ram(rig: &mut Rig) -> Vec<u8> {
        use std::io::Write;
        let ram: Vec<u8> = (0..0x10000u32).map(|i| (i * 7 + 1) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&ram).unwrap();
        rig.card.dma_map(0x10_0000, 0x10000, 0, Some(f), true).unwrap();
        ram
    }

    /// A DMA doorbell: `ranges` in `slot`, `length` as given.
    fn dma_chunk(rig: &mut Rig, slot: u32, ranges: &[DmaRange], length: u32) {
        rig.wait_slot(slot);
        let list: Vec<u8> = ranges.iter().flat_map(|r| r.to_bytes()).collect();
        rig.card.window().write(slot as u64 * abi::SLOT_SIZE as u64, &list).unwrap();
        rig.card.write(regs::CHUNK_OFFSET_LO as u64, &abi::OFFSET_SEQUENTIAL.to_le_bytes());
        rig.w(regs::CHUNK_LENGTH, length);
        rig.w(regs::CHUNK_TYPE, DumpIoType::Body as u32);
        rig.w(regs::CHUNK_SLOT, slot);
        rig.w(regs::CHUNK_FLAGS, chunk_flags::DMA);
        rig.w(regs::CHUNK_RANGES, ranges.len() as u32);
        rig.w(regs::DOORBELL, 1);
    }

    fn range(address: u64, length: u32) -> DmaRange {
        DmaRange { address, length, reserved: 0 }
    }

    #[test]
    fn dma_probe_reads_guest_memory_or_refuses() {
        let mut rig = Rig::new(1 << 20);
        assert_ne!(rig.r(regs::CAPABILITIES) & cap::DMA, 0);
        rig.card.write(regs::DMA_PROBE_ADDR_LO as u64, &0x10_0040u64.to_le_bytes());
        rig.w(regs::CONTROL, control::DMA_PROBE);
        assert_eq!(rig.error(), ErrorCode::BadDma, "no memory mapped yet");
        assert_eq!(rig.r(regs::DMA_PROBE_DATA), 0);
        let ram = guest_ram(&mut rig);
        rig.w(regs::CONTROL, control::CLEAR_ERROR | control::DMA_PROBE);
        assert_eq!(rig.error(), ErrorCode::None);
        for i in 0..abi::DMA_PROBE_SIZE / 4 {
            let want = u32::from_le_bytes(ram[0x40 + 4 * i..0x44 + 4 * i].try_into().unwrap());
            assert_eq!(rig.r(regs::DMA_PROBE_DATA + 4 * i as u32), want);
        }
        // Past the end of the mapping: refused, and the data reads zero again.
        rig.w(regs::DMA_PROBE_ADDR_LO, 0x10_FFF0);
        rig.w(regs::CONTROL, control::DMA_PROBE);
        assert_eq!(rig.error(), ErrorCode::BadDma);
        assert_eq!(rig.r(regs::DMA_PROBE_DATA), 0);
        rig.card.disconnect();
        rig.w(regs::DMA_PROBE_ADDR_LO, 0x10_0040);
        rig.w(regs::CONTROL, control::DMA_PROBE);
        assert_eq!(rig.error(), ErrorCode::BadDma, "a new client brings its own mappings");
    }

    #[test]
    fn dma_chunks_come_from_guest_memory_and_bad_lists_are_refused() {
        let mut rig = Rig::new(1 << 20);
        let ram = guest_ram(&mut rig);
        rig.w(regs::CONTROL, control::ARM);
        // Two ranges out of order in guest memory, then a copy-mode chunk after them.
        dma_chunk(&mut rig, 0, &[range(0x10_2000, 0x3000), range(0x10_0100, 0x10)], 0x3010);
        assert_eq!(rig.error(), ErrorCode::None);
        rig.w(regs::CHUNK_FLAGS, 0);
        rig.chunk(1, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, &[9; 5]);
        let big = [range(0x10_0000, 0x10000); 17]; // more than a slot
        let bad: [(&[DmaRange], u32, ErrorCode); 8] = [
            (&[range(0x10_F000, 0x1001)], 0x1001, ErrorCode::BadDma), // past the mapping
            (&[range(0x20_0000, 1)], 1, ErrorCode::BadDma),           // not mapped
            (&[range(0x10_0000, 0)], 1, ErrorCode::BadDma),           // empty entry
            (&[DmaRange { reserved: 1, ..range(0x10_0000, 1) }], 1, ErrorCode::BadDma),
            (&[range(0x10_0000, 8)], 9, ErrorCode::BadLength), // lengths do not add up
            (&[range(0x10_0000, 8)], 7, ErrorCode::BadLength),
            (&[], 1, ErrorCode::BadLength), // no entry
            (&big, 0x11_0000, ErrorCode::BadLength),
        ];
        for (ranges, length, code) in bad {
            rig.w(regs::CONTROL, control::CLEAR_ERROR);
            dma_chunk(&mut rig, 2, ranges, length);
            assert_eq!(rig.error(), code, "{ranges:?} {length}");
        }
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.w(regs::CHUNK_FLAGS, 1 << 7);
        rig.w(regs::DOORBELL, 1);
        assert_eq!(rig.error(), ErrorCode::BadDma, "an undefined flag");
        rig.w(regs::CHUNK_FLAGS, chunk_flags::DMA);
        rig.w(regs::CHUNK_RANGES, abi::MAX_DMA_RANGES + 1);
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.w(regs::DOORBELL, 1);
        assert_eq!(rig.error(), ErrorCode::BadLength, "too many entries");
        rig.w(regs::CHUNK_FLAGS, 0);
        rig.complete();
        rig.settle();
        let sc = rig.sidecar(0);
        assert_eq!((sc.chunks, sc.dma_chunks, sc.bytes_received), (2, 1, 0x3015));
        let data = std::fs::read(&rig.card.finished()[0].dump_path).unwrap();
        assert_eq!(&data[..0x3000], &ram[0x2000..0x5000]);
        assert_eq!(&data[0x3000..0x3010], &ram[0x100..0x110]);
        assert_eq!(&data[0x3010..], &[9; 5]);
        assert_eq!(sc.rejected_chunks, 10);
    }

    #[test]
    fn chunks_are_refused_unless_armed() {
        let mut rig = Rig::new(1 << 20);
        rig.chunk(0, DumpIoType::Body, 0, &[1; 10]);
        assert_eq!(rig.error(), ErrorCode::BadState);
        assert_ne!(rig.r(regs::STATUS) & status::ERROR, 0);
        assert_eq!(rig.r(regs::COMPLETED), 1, "a refused doorbell still completes");
        assert_eq!(std::fs::read_dir(rig.dir()).unwrap().count(), 0, "no file for a refused chunk");
        rig.w(regs::CONTROL, control::ARM);
        assert_eq!(rig.error(), ErrorCode::None, "arming clears the error");
    }

    #[test]
    fn every_bad_descriptor_gets_its_code_and_the_session_survives() {
        let mut rig = Rig::new(8192);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, &[7; 4096]);
        type Case<'a> = (&'a dyn Fn(&mut Rig), ErrorCode);
        let cases: [Case; 7] = [
            (
                &|r| {
                    r.w(regs::CHUNK_SLOT, abi::SLOT_COUNT);
                    r.w(regs::CHUNK_LENGTH, 1);
                    r.w(regs::CHUNK_TYPE, 2);
                    r.w(regs::DOORBELL, 1)
                },
                ErrorCode::BadSlot,
            ),
            (
                &|r| {
                    r.w(regs::CHUNK_SLOT, 0);
                    r.w(regs::CHUNK_LENGTH, abi::SLOT_SIZE + 1);
                    r.w(regs::DOORBELL, 1)
                },
                ErrorCode::BadLength,
            ),
            (
                &|r| {
                    r.w(regs::CHUNK_LENGTH, 0);
                    r.w(regs::DOORBELL, 1)
                },
                ErrorCode::BadLength,
            ),
            (
                &|r| {
                    r.w(regs::CHUNK_LENGTH, 1);
                    r.w(regs::CHUNK_TYPE, 0);
                    r.w(regs::DOORBELL, 1)
                },
                ErrorCode::BadType,
            ),
            (
                &|r| {
                    r.w(regs::CHUNK_TYPE, 99);
                    r.w(regs::DOORBELL, 1)
                },
                ErrorCode::BadType,
            ),
            (&|r| r.chunk(0, DumpIoType::Body, u64::MAX - 2, &[1; 8]), ErrorCode::BadOffset),
            (&|r| r.chunk(0, DumpIoType::Body, 8000, &[1; 200]), ErrorCode::TooLarge),
        ];
        for (i, (act, code)) in cases.iter().enumerate() {
            act(&mut rig);
            assert_eq!(rig.error(), *code, "case {i}");
            rig.w(regs::CONTROL, control::CLEAR_ERROR);
        }
        rig.w(regs::CHUNK_LENGTH, 5);
        rig.w(regs::CHUNK_TYPE, DumpIoType::Complete as u32);
        rig.w(regs::DOORBELL, 1);
        assert_eq!(rig.error(), ErrorCode::BadLength, "complete carries no bytes");
        rig.complete();
        rig.settle();
        assert_eq!(rig.state(), SessionState::Complete);
        let sc = rig.sidecar(0);
        assert_eq!(sc.rejected_chunks, 8);
        assert_eq!(sc.size, 4096, "no refused chunk touched the file");
        assert!(sc.first_error.unwrap().starts_with("bad-slot"));
    }

    #[test]
    fn first_error_stays_latched() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ANNOUNCE); // not armed
        rig.w(regs::MAGIC, 1); // read-only
        assert_eq!(rig.error(), ErrorCode::BadState);
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.w(regs::CONTROL, 1 << 31);
        assert_eq!(rig.error(), ErrorCode::BadCommand);
    }

    #[test]
    fn bad_accesses_are_refused_without_effect() {
        let mut rig = Rig::new(1 << 20);
        let mut b2 = [0u8; 2];
        rig.card.read(regs::STATUS as u64, &mut b2);
        assert_eq!(rig.error(), ErrorCode::BadAccess);
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.card.write(regs::CONTROL as u64, &[control::ARM as u8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rig.error(), ErrorCode::BadAccess, "8-byte write to a 32-bit register");
        assert_eq!(rig.state(), SessionState::Idle);
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.card.write(0x21, &[0; 4]);
        rig.card.write(u64::MAX - 1, &[0; 4]);
        rig.card.read(0xFFC, &mut [0; 4]);
        rig.card.write(0, &[]);
        assert_eq!(rig.error(), ErrorCode::BadAccess);
        assert_eq!(rig.state(), SessionState::Idle);
    }

    /// Found by reading what the `vfio_messages` fuzz target reaches: a 4 GiB region read must
    /// not be zeroed (committed) by the card before it is refused.
    #[test]
    fn a_read_wider_than_a_register_is_refused_without_touching_the_buffer() {
        let mut rig = Rig::new(1 << 20);
        let mut wide = vec![0xAAu8; 64];
        rig.card.read(regs::STATUS as u64, &mut wide);
        assert!(wide.iter().all(|&b| b == 0xAA));
        assert_eq!(rig.error(), ErrorCode::BadAccess);
    }

    #[test]
    fn reset_abort_and_rearm_make_separate_dumps() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"first");
        rig.w(regs::CONTROL, control::ABORT);
        assert_eq!(rig.state(), SessionState::Aborted);
        rig.w(regs::CONTROL, control::ABORT); // no-op without a session
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(1, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"second");
        rig.card.bus_reset();
        assert_eq!(rig.state(), SessionState::Idle);
        assert_eq!(rig.r(regs::COMPLETED), 0);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(2, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"third");
        rig.complete();
        rig.w(regs::CONTROL, control::ABORT); // while finishing or after completion: no-op
        rig.settle();
        assert_eq!(rig.state(), SessionState::Complete);
        let f = rig.card.wait_writers();
        assert_eq!(f.len(), 3);
        assert_eq!(std::fs::read(&f[0].dump_path).unwrap(), b"first");
        assert_eq!(std::fs::read(&f[1].dump_path).unwrap(), b"second");
        assert_eq!(std::fs::read(&f[2].dump_path).unwrap(), b"third");
        assert_eq!(
            rig.sidecar(0).incomplete_reason.as_deref(),
            Some("aborted by the guest driver")
        );
        assert_eq!(
            rig.sidecar(1).incomplete_reason.as_deref(),
            Some("VM reset while the dump was streaming")
        );
        assert_eq!(rig.sidecar(2).state, DumpState::Complete);
    }

    #[test]
    fn arming_mid_session_is_refused() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"x");
        rig.w(regs::CONTROL, control::ARM);
        assert_eq!(rig.error(), ErrorCode::BadState);
        assert_eq!(rig.state(), SessionState::Streaming);
        rig.card.disconnect();
        assert_eq!(
            rig.sidecar(0).incomplete_reason.as_deref(),
            Some("VM disconnected while the dump was streaming")
        );
    }

    #[test]
    fn a_slot_the_writer_owns_holds_completed_back_and_refuses_reuse() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"zero");
        rig.wait_slot(0);
        assert_eq!(rig.r(regs::COMPLETED), 1);
        // Stand in for a writer stuck on a slow disk: slot 1 is owned by doorbell 1.
        assert!(rig.card.window().claim(1, SlotOwner { epoch: rig.card.epoch, seq: 1 }));
        rig.card.rung += 1;
        rig.chunk(2, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"two");
        rig.wait_slot(2);
        assert_eq!(rig.r(regs::COMPLETED), 1, "doorbell 2 is written, doorbell 1 is not");
        // Reusing the owned slot is refused, not queued and not blocking.
        rig.w(regs::CHUNK_SLOT, 1);
        rig.w(regs::DOORBELL, 1);
        assert_eq!(rig.error(), ErrorCode::SlotBusy);
        assert_eq!(rig.r(regs::COMPLETED), 1);
        rig.card.window().release(1);
        assert_eq!(rig.r(regs::COMPLETED), 4, "every doorbell finished, in order");
        rig.w(regs::CONTROL, control::CLEAR_ERROR);
        rig.complete();
        let sc = rig.sidecar(0);
        assert_eq!(sc.bytes_received, 7);
        assert_eq!(sc.rejected_chunks, 1);
        assert!(sc.first_error.unwrap().starts_with("slot-busy"));
    }

    #[test]
    fn a_reset_while_finishing_keeps_the_dump_complete() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Header, abi::OFFSET_SEQUENTIAL, &[5; 4096]);
        rig.complete();
        rig.card.bus_reset();
        rig.card.disconnect();
        assert_eq!(rig.state(), SessionState::Idle);
        let sc = rig.sidecar(0);
        assert_eq!(sc.state, DumpState::Complete);
        assert_eq!(sc.incomplete_reason, None);
        assert_eq!(sc.sha256_source, Some(HashSource::Streamed));
        assert!(sc.longest_answer_us.is_some());
        assert_eq!(rig.card.wait_writers().len(), 1, "no second file for the reset");
    }

    #[test]
    fn arming_while_finishing_lets_the_dump_finish() {
        let mut rig = Rig::new(1 << 20);
        rig.w(regs::CONTROL, control::ARM);
        rig.chunk(0, DumpIoType::Body, abi::OFFSET_SEQUENTIAL, b"dump");
        rig.complete();
        rig.w(regs::CONTROL, control::ARM);
        assert_eq!(rig.error(), ErrorCode::None);
        assert_eq!(rig.state(), SessionState::Armed);
        assert_eq!(rig.sidecar(0).state, DumpState::Complete);
    }

    #[test]
    fn a_file_that_cannot_be_created_latches_host_io_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig::new(dir.path().join("missing"), "t", 1 << 20);
        let mut card = CrashMonitorCard::new(config, DataWindow::new().unwrap());
        card.write(regs::CONTROL as u64, &control::ARM.to_le_bytes());
        card.write(regs::CONTROL as u64, &control::ANNOUNCE.to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut b = [0; 4];
            card.read(regs::ERROR as u64, &mut b);
            if u32::from_le_bytes(b) == ErrorCode::HostIo as u32 {
                break;
            }
            assert!(Instant::now() < deadline, "HOST_IO never latched");
            std::thread::sleep(Duration::from_millis(1));
        }
        card.write(regs::CHUNK_LENGTH as u64, &0u32.to_le_bytes());
        card.write(regs::CHUNK_TYPE as u64, &(DumpIoType::Complete as u32).to_le_bytes());
        card.write(regs::DOORBELL as u64, &1u32.to_le_bytes());
        card.wait_writers();
        assert_eq!(
            card.state(),
            SessionState::Aborted,
            "a dump that could not be made is not complete"
        );
    }

    #[test]
    fn host_clock_advances() {
        let mut rig = Rig::new(1 << 20);
        let a = rig.r(regs::HOST_CLOCK_MS);
        std::thread::sleep(Duration::from_millis(20));
        assert!(rig.r(regs::HOST_CLOCK_MS).wrapping_sub(a) >= 20);
    }
}
