//! The crash-monitor card's behaviour: the BAR0 register file and the session state machine.
//!
//! Register offsets, bits, states and error codes come from `crashmon-card-abi`, the datasheet
//! shared with the guest driver. Everything here is driven by guest writes, so every value is
//! checked and a bad one becomes an error code in the register file, never a panic, a write
//! outside the session's file, or a file past the maximum size.

use crate::capture::{BugCheckInfo, BugCheckSource, CaptureConfig, ChunkError, Finished, Session};
use crate::data_window::DataWindow;
use crashmon_card_abi::{
    self as abi, cap, control, regs, status, DumpIoType, ErrorCode, SessionState,
};
use log::{debug, error, warn};

/// The card's state: one struct, as on the datasheet.
pub struct CrashMonitorCard {
    capture: CaptureConfig,
    window: DataWindow,
    state: SessionState,
    error: ErrorCode,
    completed: u32,
    bugcheck_code: u32,
    bugcheck_params: [u64; 4],
    chunk_offset: u64,
    chunk_length: u32,
    chunk_type: u32,
    chunk_slot: u32,
    bytes_written: u64,
    session: Option<Session>,
    /// Host-owned copy of the slot being written: preallocated once, so a doorbell never
    /// allocates, and the guest cannot change bytes between the file write and the hash.
    bounce: Vec<u8>,
    finished: Vec<Finished>,
}

impl CrashMonitorCard {
    /// A card in its power-on state.
    pub fn new(capture: CaptureConfig, window: DataWindow) -> Self {
        Self {
            capture,
            window,
            state: SessionState::Idle,
            error: ErrorCode::None,
            completed: 0,
            bugcheck_code: 0,
            bugcheck_params: [0; 4],
            chunk_offset: 0,
            chunk_length: 0,
            chunk_type: 0,
            chunk_slot: 0,
            bytes_written: 0,
            session: None,
            bounce: vec![0; abi::SLOT_SIZE as usize],
            finished: Vec::new(),
        }
    }

    /// The data window behind BAR2.
    pub fn window(&self) -> &DataWindow {
        &self.window
    }

    /// The session state.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// Sessions closed so far, oldest first.
    pub fn finished(&self) -> &[Finished] {
        &self.finished
    }

    /// A BAR0 read of 4 bytes, or 8 bytes at a `_LO` register.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
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
    }

    /// The device model is stopping.
    pub fn shutdown(&mut self, why: &str) {
        self.reset(why);
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
                self.state as u32 | status::READY | error
            }
            regs::ERROR => self.error as u32,
            regs::COMPLETED => self.completed,
            regs::BUGCHECK_CODE => self.bugcheck_code,
            o @ regs::BUGCHECK_PARAM1_LO..=regs::BUGCHECK_PARAM4_HI => {
                let i = (o - regs::BUGCHECK_PARAM1_LO) / 4;
                p(i as usize / 2, i % 2 == 1)
            }
            regs::CHUNK_OFFSET_LO => self.chunk_offset as u32,
            regs::CHUNK_OFFSET_HI => (self.chunk_offset >> 32) as u32,
            regs::CHUNK_LENGTH => self.chunk_length,
            regs::CHUNK_TYPE => self.chunk_type,
            regs::CHUNK_SLOT => self.chunk_slot,
            regs::BYTES_WRITTEN_LO => self.bytes_written as u32,
            regs::BYTES_WRITTEN_HI => (self.bytes_written >> 32) as u32,
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
                if i % 2 == 0 {
                    set_lo(param, v)
                } else {
                    set_hi(param, v)
                }
            }
            regs::CHUNK_OFFSET_LO => set_lo(&mut self.chunk_offset, v),
            regs::CHUNK_OFFSET_HI => set_hi(&mut self.chunk_offset, v),
            regs::CHUNK_LENGTH => self.chunk_length = v,
            regs::CHUNK_TYPE => self.chunk_type = v,
            regs::CHUNK_SLOT => self.chunk_slot = v,
            regs::DOORBELL => {
                if let Err(code) = self.doorbell() {
                    self.refuse(code, "doorbell");
                }
                self.completed = self.completed.wrapping_add(1);
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
                SessionState::Idle
                | SessionState::Armed
                | SessionState::Complete
                | SessionState::Aborted => {
                    self.state = SessionState::Armed;
                    self.error = ErrorCode::None;
                }
                _ => self.refuse(ErrorCode::BadState, "arm"),
            }
        }
        if v & control::ANNOUNCE != 0 {
            if self.state != SessionState::Armed {
                self.refuse(ErrorCode::BadState, "announce");
            } else {
                warn!(
                    "VM {} bug checked: code {:#010x} parameters {:#x?}",
                    self.capture.vm_name, self.bugcheck_code, self.bugcheck_params
                );
                let info = BugCheckInfo::new(
                    self.bugcheck_code,
                    self.bugcheck_params,
                    BugCheckSource::Announced,
                );
                if self.open_session(Some(info)) {
                    self.state = SessionState::BugCheckAnnounced;
                }
            }
        }
        if v & control::ABORT != 0 {
            self.close_session(Some("aborted by the guest driver"));
        }
    }

    /// Acts on the chunk described by the CHUNK_* registers.
    fn doorbell(&mut self) -> Result<(), ErrorCode> {
        if !matches!(
            self.state,
            SessionState::Armed | SessionState::BugCheckAnnounced | SessionState::Streaming
        ) {
            return Err(ErrorCode::BadState);
        }
        let kind = DumpIoType::from_u32(self.chunk_type)
            .filter(|t| *t != DumpIoType::Invalid)
            .ok_or(ErrorCode::BadType)?;
        if kind == DumpIoType::Complete {
            if self.chunk_length != 0 {
                return Err(ErrorCode::BadLength);
            }
            if self.session.is_none() {
                return Err(ErrorCode::BadState);
            }
            self.close_session(None);
            return Ok(());
        }
        if self.chunk_slot >= abi::SLOT_COUNT {
            return Err(ErrorCode::BadSlot);
        }
        let len = self.chunk_length as usize;
        if len == 0 || len > abi::SLOT_SIZE as usize {
            return Err(ErrorCode::BadLength);
        }
        if self.session.is_none() {
            warn!("VM {} is streaming a dump (not announced)", self.capture.vm_name);
            if !self.open_session(None) {
                return Err(ErrorCode::HostIo);
            }
        }
        self.state = SessionState::Streaming;
        let data = &mut self.bounce[..len];
        self.window.copy_out(self.chunk_slot, data).ok_or(ErrorCode::BadSlot)?;
        let offset = (self.chunk_offset != abi::OFFSET_SEQUENTIAL).then_some(self.chunk_offset);
        let Some(session) = self.session.as_mut() else {
            return Err(ErrorCode::BadState);
        };
        match session.write(kind, offset, data) {
            Ok(()) => {
                self.bytes_written = session.bytes_received();
                Ok(())
            }
            Err(ChunkError::Overflow { .. }) => Err(ErrorCode::BadOffset),
            Err(ChunkError::TooLarge { .. }) => Err(ErrorCode::TooLarge),
            Err(ChunkError::Io(e)) => {
                error!("VM {}: writing the dump failed: {e}", self.capture.vm_name);
                Err(ErrorCode::HostIo)
            }
        }
    }

    fn open_session(&mut self, bugcheck: Option<BugCheckInfo>) -> bool {
        match Session::open(&self.capture, bugcheck) {
            Ok(s) => {
                self.session = Some(s);
                self.bytes_written = 0;
                true
            }
            Err(e) => {
                error!("VM {}: cannot create a dump file: {e}", self.capture.vm_name);
                self.refuse(ErrorCode::HostIo, "open session");
                false
            }
        }
    }

    /// Closes the open session, if any: complete when `incomplete` is `None`.
    fn close_session(&mut self, incomplete: Option<&str>) {
        let Some(session) = self.session.take() else {
            return;
        };
        self.state =
            if incomplete.is_none() { SessionState::Complete } else { SessionState::Aborted };
        match session.finish(incomplete) {
            Ok(f) => self.finished.push(f),
            Err(e) => {
                error!("VM {}: closing the dump failed: {e}", self.capture.vm_name);
                self.state = SessionState::Aborted;
                self.refuse(ErrorCode::HostIo, "close session");
            }
        }
    }

    fn reset(&mut self, why: &str) {
        self.close_session(Some(why));
        self.state = SessionState::Idle;
        self.error = ErrorCode::None;
        self.completed = 0;
        self.bugcheck_code = 0;
        self.bugcheck_params = [0; 4];
        self.chunk_offset = 0;
        self.chunk_length = 0;
        self.chunk_type = 0;
        self.chunk_slot = 0;
        self.bytes_written = 0;
    }

    fn refuse(&mut self, code: ErrorCode, what: &str) {
        let detail = format!(
            "{}: {what} in state {:?} (offset {:#x}, length {}, type {}, slot {})",
            code.name(),
            self.state,
            self.chunk_offset,
            self.chunk_length,
            self.chunk_type,
            self.chunk_slot
        );
        debug!("VM {}: refused {detail}", self.capture.vm_name);
        if let Some(s) = self.session.as_mut() {
            s.note_refusal(&detail);
        }
        if self.error == ErrorCode::None {
            self.error = code;
        }
    }

    fn refuse_access(&mut self, offset: u64) -> u32 {
        debug!("VM {}: bad register access at {offset:#x}", self.capture.vm_name);
        if self.error == ErrorCode::None {
            self.error = ErrorCode::BadAccess;
        }
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
            | regs::BYTES_WRITTEN_LO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{DumpState, Sidecar};
    use std::path::Path;

    struct Rig {
        card: CrashMonitorCard,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new(max: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let config = CaptureConfig {
                output_dir: dir.path().to_owned(),
                vm_name: "t".into(),
                max_dump_size: max,
            };
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
        /// Puts `data` in `slot` and rings the doorbell.
        fn chunk(&mut self, slot: u32, kind: DumpIoType, offset: u64, data: &[u8]) {
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
        fn sidecar(&self, i: usize) -> Sidecar {
            let f = &self.card.finished()[i];
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
        assert_eq!(rig.r(regs::COMPLETED), 3);
        assert_eq!(rig.r(regs::BYTES_WRITTEN_LO), 350);
        rig.complete();
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
        let cases: [(&dyn Fn(&mut Rig), ErrorCode); 7] = [
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
        rig.w(regs::CONTROL, control::ABORT); // after completion: no-op
        assert_eq!(rig.state(), SessionState::Complete);
        let f = rig.card.finished();
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
}
