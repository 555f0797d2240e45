//! The AMD64 `CONTEXT` record (0x4D0 bytes) that a 64-bit dump header carries at
//! [`crate::format::header64::CONTEXT_RECORD`].

use core::mem::{align_of, offset_of, size_of};

/// `CONTEXT_AMD64`: the architecture bit every AMD64 `ContextFlags` value carries.
pub const CONTEXT_AMD64: u32 = 0x0010_0000;
/// `CONTEXT_CONTROL`: `SegSs`, `Rsp`, `SegCs`, `Rip` and `EFlags` are valid.
pub const CONTEXT_CONTROL: u32 = CONTEXT_AMD64 | 0x1;
/// `CONTEXT_INTEGER`: `Rax`..`R15` (except `Rsp`) are valid.
pub const CONTEXT_INTEGER: u32 = CONTEXT_AMD64 | 0x2;
/// `CONTEXT_SEGMENTS`: `SegDs`, `SegEs`, `SegFs` and `SegGs` are valid.
pub const CONTEXT_SEGMENTS: u32 = CONTEXT_AMD64 | 0x4;
/// `CONTEXT_FLOATING_POINT`: `FltSave` (and `MxCsr`) are valid.
pub const CONTEXT_FLOATING_POINT: u32 = CONTEXT_AMD64 | 0x8;
/// `CONTEXT_DEBUG_REGISTERS`: `Dr0`..`Dr7` are valid.
pub const CONTEXT_DEBUG_REGISTERS: u32 = CONTEXT_AMD64 | 0x10;
/// `CONTEXT_FULL`: control, integer and floating point.
pub const CONTEXT_FULL: u32 = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_FLOATING_POINT;
/// `CONTEXT_ALL`: everything above, segments and debug registers included.
pub const CONTEXT_ALL: u32 = CONTEXT_FULL | CONTEXT_SEGMENTS | CONTEXT_DEBUG_REGISTERS;

/// `M128A`: one 128-bit register (an XMM register, or an x87 register in its 16-byte slot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct M128A {
    /// Bits 0..64 (`Low`).
    pub low: u64,
    /// Bits 64..128 (`High`).
    pub high: u64,
}

/// `XMM_SAVE_AREA32`: the 512-byte `FXSAVE` image that `CONTEXT.FltSave` holds.
///
/// | offset | field |
/// |---|---|
/// | 0x00 | `ControlWord` (u16) |
/// | 0x02 | `StatusWord` (u16) |
/// | 0x04 | `TagWord` (u8), `Reserved1` (u8) |
/// | 0x06 | `ErrorOpcode` (u16) |
/// | 0x08 | `ErrorOffset` (u32) |
/// | 0x0C | `ErrorSelector` (u16), `Reserved2` (u16) |
/// | 0x10 | `DataOffset` (u32) |
/// | 0x14 | `DataSelector` (u16), `Reserved3` (u16) |
/// | 0x18 | `MxCsr` (u32) |
/// | 0x1C | `MxCsr_Mask` (u32) |
/// | 0x20 | `FloatRegisters[8]` (M128A) |
/// | 0xA0 | `XmmRegisters[16]` (M128A) |
/// | 0x1A0 | `Reserved4[96]` |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct XmmSaveArea32 {
    /// x87 control word.
    pub control_word: u16,
    /// x87 status word.
    pub status_word: u16,
    /// x87 abridged tag word.
    pub tag_word: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Last x87 opcode.
    pub error_opcode: u16,
    /// Last x87 instruction pointer, offset.
    pub error_offset: u32,
    /// Last x87 instruction pointer, selector.
    pub error_selector: u16,
    /// Reserved.
    pub reserved2: u16,
    /// Last x87 operand pointer, offset.
    pub data_offset: u32,
    /// Last x87 operand pointer, selector.
    pub data_selector: u16,
    /// Reserved.
    pub reserved3: u16,
    /// MXCSR.
    pub mx_csr: u32,
    /// MXCSR_MASK.
    pub mx_csr_mask: u32,
    /// ST0..ST7 / MM0..MM7.
    pub float_registers: [M128A; 8],
    /// XMM0..XMM15.
    pub xmm_registers: [M128A; 16],
    /// Reserved (and available to software in `FXSAVE`).
    pub reserved4: [u8; 96],
}

impl XmmSaveArea32 {
    /// An all-zero save area.
    pub const fn zeroed() -> Self {
        const Z: M128A = M128A { low: 0, high: 0 };
        Self {
            control_word: 0,
            status_word: 0,
            tag_word: 0,
            reserved1: 0,
            error_opcode: 0,
            error_offset: 0,
            error_selector: 0,
            reserved2: 0,
            data_offset: 0,
            data_selector: 0,
            reserved3: 0,
            mx_csr: 0,
            mx_csr_mask: 0,
            float_registers: [Z; 8],
            xmm_registers: [Z; 16],
            reserved4: [0; 96],
        }
    }
}

impl Default for XmmSaveArea32 {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// The AMD64 `CONTEXT` record, with Windows' layout (0x4D0 bytes, 16-byte aligned).
///
/// | offset | field |
/// |---|---|
/// | 0x000 | `P1Home`..`P6Home` (u64 each) |
/// | 0x030 | `ContextFlags` (u32) |
/// | 0x034 | `MxCsr` (u32) |
/// | 0x038 | `SegCs`, `SegDs`, `SegEs`, `SegFs`, `SegGs`, `SegSs` (u16 each) |
/// | 0x044 | `EFlags` (u32) |
/// | 0x048 | `Dr0`, `Dr1`, `Dr2`, `Dr3`, `Dr6`, `Dr7` (u64 each) |
/// | 0x078 | `Rax`, `Rcx`, `Rdx`, `Rbx`, `Rsp`, `Rbp`, `Rsi`, `Rdi`, `R8`..`R15` (u64 each) |
/// | 0x0F8 | `Rip` (u64) |
/// | 0x100 | `FltSave` ([`XmmSaveArea32`], 0x200 bytes) |
/// | 0x300 | `VectorRegister[26]` ([`M128A`]) |
/// | 0x4A0 | `VectorControl` (u64) |
/// | 0x4A8 | `DebugControl` (u64) |
/// | 0x4B0 | `LastBranchToRip`, `LastBranchFromRip` (u64 each) |
/// | 0x4C0 | `LastExceptionToRip`, `LastExceptionFromRip` (u64 each) |
///
/// The dump header stores it with [`Context::to_bytes`], field by field in little-endian order,
/// so the struct's in-memory representation never matters to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct Context {
    /// Register parameter home addresses (`P1Home`).
    pub p1_home: u64,
    /// `P2Home`.
    pub p2_home: u64,
    /// `P3Home`.
    pub p3_home: u64,
    /// `P4Home`.
    pub p4_home: u64,
    /// `P5Home`.
    pub p5_home: u64,
    /// `P6Home`.
    pub p6_home: u64,
    /// Which parts of the record are valid: `CONTEXT_*` flags, e.g. [`CONTEXT_ALL`].
    pub context_flags: u32,
    /// MXCSR.
    pub mx_csr: u32,
    /// CS.
    pub seg_cs: u16,
    /// DS.
    pub seg_ds: u16,
    /// ES.
    pub seg_es: u16,
    /// FS.
    pub seg_fs: u16,
    /// GS.
    pub seg_gs: u16,
    /// SS.
    pub seg_ss: u16,
    /// RFLAGS (low 32 bits).
    pub eflags: u32,
    /// DR0.
    pub dr0: u64,
    /// DR1.
    pub dr1: u64,
    /// DR2.
    pub dr2: u64,
    /// DR3.
    pub dr3: u64,
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// RAX.
    pub rax: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RBX.
    pub rbx: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// RIP.
    pub rip: u64,
    /// x87/SSE state (`FltSave`).
    pub flt_save: XmmSaveArea32,
    /// `VectorRegister[26]`.
    pub vector_register: [M128A; 26],
    /// `VectorControl`.
    pub vector_control: u64,
    /// `DebugControl`.
    pub debug_control: u64,
    /// `LastBranchToRip`.
    pub last_branch_to_rip: u64,
    /// `LastBranchFromRip`.
    pub last_branch_from_rip: u64,
    /// `LastExceptionToRip`.
    pub last_exception_to_rip: u64,
    /// `LastExceptionFromRip`.
    pub last_exception_from_rip: u64,
}

const _: () = {
    assert!(size_of::<M128A>() == 0x10);
    assert!(size_of::<XmmSaveArea32>() == 0x200);
    assert!(offset_of!(XmmSaveArea32, mx_csr) == 0x18);
    assert!(offset_of!(XmmSaveArea32, float_registers) == 0x20);
    assert!(offset_of!(XmmSaveArea32, xmm_registers) == 0xA0);
    assert!(offset_of!(XmmSaveArea32, reserved4) == 0x1A0);
    assert!(size_of::<Context>() == crate::CONTEXT_SIZE);
    assert!(align_of::<Context>() == 16);
    assert!(offset_of!(Context, context_flags) == 0x30);
    assert!(offset_of!(Context, mx_csr) == 0x34);
    assert!(offset_of!(Context, seg_cs) == 0x38);
    assert!(offset_of!(Context, seg_ss) == 0x42);
    assert!(offset_of!(Context, eflags) == 0x44);
    assert!(offset_of!(Context, dr0) == 0x48);
    assert!(offset_of!(Context, dr7) == 0x70);
    assert!(offset_of!(Context, rax) == 0x78);
    assert!(offset_of!(Context, rsp) == 0x98);
    assert!(offset_of!(Context, r15) == 0xF0);
    assert!(offset_of!(Context, rip) == 0xF8);
    assert!(offset_of!(Context, flt_save) == 0x100);
    assert!(offset_of!(Context, vector_register) == 0x300);
    assert!(offset_of!(Context, vector_control) == 0x4A0);
    assert!(offset_of!(Context, last_exception_from_rip) == 0x4C8);
};

/// Little-endian writer over a fixed array; every write stays in bounds by construction (the
/// field list below adds up to exactly the array's size, which the tests check).
struct Put<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Put<'_> {
    fn bytes(&mut self, b: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + b.len()) {
            dst.copy_from_slice(b);
        }
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn m128(&mut self, v: &M128A) {
        self.u64(v.low);
        self.u64(v.high);
    }
}

/// Little-endian reader, the mirror of [`Put`].
struct Get<'a> {
    src: &'a [u8],
    at: usize,
}

impl Get<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(src) = self.src.get(self.at..self.at + N) {
            a.copy_from_slice(src);
        }
        self.at += N;
        a
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    fn m128(&mut self) -> M128A {
        M128A { low: self.u64(), high: self.u64() }
    }
}

impl Context {
    /// An all-zero record (`ContextFlags` 0 included: set [`Context::context_flags`] to say
    /// which parts are valid, usually [`CONTEXT_ALL`] or [`CONTEXT_FULL`]).
    pub const fn zeroed() -> Self {
        const Z: M128A = M128A { low: 0, high: 0 };
        Self {
            p1_home: 0,
            p2_home: 0,
            p3_home: 0,
            p4_home: 0,
            p5_home: 0,
            p6_home: 0,
            context_flags: 0,
            mx_csr: 0,
            seg_cs: 0,
            seg_ds: 0,
            seg_es: 0,
            seg_fs: 0,
            seg_gs: 0,
            seg_ss: 0,
            eflags: 0,
            dr0: 0,
            dr1: 0,
            dr2: 0,
            dr3: 0,
            dr6: 0,
            dr7: 0,
            rax: 0,
            rcx: 0,
            rdx: 0,
            rbx: 0,
            rsp: 0,
            rbp: 0,
            rsi: 0,
            rdi: 0,
            r8: 0,
            r9: 0,
            r10: 0,
            r11: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
            rip: 0,
            flt_save: XmmSaveArea32::zeroed(),
            vector_register: [Z; 26],
            vector_control: 0,
            debug_control: 0,
            last_branch_to_rip: 0,
            last_branch_from_rip: 0,
            last_exception_to_rip: 0,
            last_exception_from_rip: 0,
        }
    }

    /// The record as Windows stores it: 0x4D0 little-endian bytes at the offsets in the table
    /// above.
    pub fn to_bytes(&self) -> [u8; crate::CONTEXT_SIZE] {
        let mut out = [0u8; crate::CONTEXT_SIZE];
        self.write_to(&mut out);
        out
    }

    /// Stores the record as [`Context::to_bytes`] does, straight into `out` (no copy of the
    /// record on the stack).
    pub fn write_to(&self, out: &mut [u8; crate::CONTEXT_SIZE]) {
        let mut p = Put { out, at: 0 };
        for v in
            [self.p1_home, self.p2_home, self.p3_home, self.p4_home, self.p5_home, self.p6_home]
        {
            p.u64(v);
        }
        p.u32(self.context_flags);
        p.u32(self.mx_csr);
        for v in [self.seg_cs, self.seg_ds, self.seg_es, self.seg_fs, self.seg_gs, self.seg_ss] {
            p.u16(v);
        }
        p.u32(self.eflags);
        for v in [self.dr0, self.dr1, self.dr2, self.dr3, self.dr6, self.dr7] {
            p.u64(v);
        }
        for v in [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi,
            self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15, self.rip,
        ] {
            p.u64(v);
        }
        let f = &self.flt_save;
        p.u16(f.control_word);
        p.u16(f.status_word);
        p.u8(f.tag_word);
        p.u8(f.reserved1);
        p.u16(f.error_opcode);
        p.u32(f.error_offset);
        p.u16(f.error_selector);
        p.u16(f.reserved2);
        p.u32(f.data_offset);
        p.u16(f.data_selector);
        p.u16(f.reserved3);
        p.u32(f.mx_csr);
        p.u32(f.mx_csr_mask);
        for r in f.float_registers.iter().chain(f.xmm_registers.iter()) {
            p.m128(r);
        }
        p.bytes(&f.reserved4);
        for r in &self.vector_register {
            p.m128(r);
        }
        for v in [
            self.vector_control,
            self.debug_control,
            self.last_branch_to_rip,
            self.last_branch_from_rip,
            self.last_exception_to_rip,
            self.last_exception_from_rip,
        ] {
            p.u64(v);
        }
        debug_assert_eq!(p.at, crate::CONTEXT_SIZE);
    }

    /// Reads a record stored by [`Context::to_bytes`] (or by Windows).
    pub fn from_bytes(bytes: &[u8; crate::CONTEXT_SIZE]) -> Self {
        let mut g = Get { src: bytes, at: 0 };
        let mut c = Self::zeroed();
        c.p1_home = g.u64();
        c.p2_home = g.u64();
        c.p3_home = g.u64();
        c.p4_home = g.u64();
        c.p5_home = g.u64();
        c.p6_home = g.u64();
        c.context_flags = g.u32();
        c.mx_csr = g.u32();
        c.seg_cs = g.u16();
        c.seg_ds = g.u16();
        c.seg_es = g.u16();
        c.seg_fs = g.u16();
        c.seg_gs = g.u16();
        c.seg_ss = g.u16();
        c.eflags = g.u32();
        c.dr0 = g.u64();
        c.dr1 = g.u64();
        c.dr2 = g.u64();
        c.dr3 = g.u64();
        c.dr6 = g.u64();
        c.dr7 = g.u64();
        c.rax = g.u64();
        c.rcx = g.u64();
        c.rdx = g.u64();
        c.rbx = g.u64();
        c.rsp = g.u64();
        c.rbp = g.u64();
        c.rsi = g.u64();
        c.rdi = g.u64();
        c.r8 = g.u64();
        c.r9 = g.u64();
        c.r10 = g.u64();
        c.r11 = g.u64();
        c.r12 = g.u64();
        c.r13 = g.u64();
        c.r14 = g.u64();
        c.r15 = g.u64();
        c.rip = g.u64();
        let f = &mut c.flt_save;
        f.control_word = g.u16();
        f.status_word = g.u16();
        f.tag_word = g.u8();
        f.reserved1 = g.u8();
        f.error_opcode = g.u16();
        f.error_offset = g.u32();
        f.error_selector = g.u16();
        f.reserved2 = g.u16();
        f.data_offset = g.u32();
        f.data_selector = g.u16();
        f.reserved3 = g.u16();
        f.mx_csr = g.u32();
        f.mx_csr_mask = g.u32();
        for r in f.float_registers.iter_mut().chain(f.xmm_registers.iter_mut()) {
            *r = g.m128();
        }
        f.reserved4 = g.array();
        for r in c.vector_register.iter_mut() {
            *r = g.m128();
        }
        c.vector_control = g.u64();
        c.debug_control = g.u64();
        c.last_branch_to_rip = g.u64();
        c.last_branch_from_rip = g.u64();
        c.last_exception_to_rip = g.u64();
        c.last_exception_from_rip = g.u64();
        c
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_put_each_field_at_its_windows_offset() {
        let mut c = Context::zeroed();
        c.context_flags = CONTEXT_ALL;
        c.mx_csr = 0x1F80;
        c.seg_cs = 0x10;
        c.seg_ss = 0x18;
        c.eflags = 0x40202;
        c.dr7 = 0x400;
        c.rax = 0x1111;
        c.rsp = 0x2222;
        c.r15 = 0x3333;
        c.rip = 0x4444;
        c.flt_save.mx_csr = 0x1F80;
        c.flt_save.xmm_registers[15].high = 0x5555;
        c.vector_register[25].low = 0x6666;
        c.last_exception_from_rip = 0x7777;
        let b = c.to_bytes();
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0x30), CONTEXT_ALL);
        assert_eq!(u32_at(0x34), 0x1F80);
        assert_eq!(u16_at(0x38), 0x10);
        assert_eq!(u16_at(0x42), 0x18);
        assert_eq!(u32_at(0x44), 0x40202);
        assert_eq!(u64_at(0x70), 0x400);
        assert_eq!(u64_at(0x78), 0x1111);
        assert_eq!(u64_at(0x98), 0x2222);
        assert_eq!(u64_at(0xF0), 0x3333);
        assert_eq!(u64_at(0xF8), 0x4444);
        assert_eq!(u32_at(0x118), 0x1F80);
        assert_eq!(u64_at(0x100 + 0xA0 + 15 * 16 + 8), 0x5555);
        assert_eq!(u64_at(0x300 + 25 * 16), 0x6666);
        assert_eq!(u64_at(0x4C8), 0x7777);
        assert_eq!(Context::from_bytes(&b), c);
    }
}
