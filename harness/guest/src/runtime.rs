//! # Runtime: what libc and the start files would otherwise provide
//!
//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` and `strlen` (the compiler and `core` emit
//! calls to them; the linux-gnu `compiler_builtins` expects libc to have them), and the unwinding
//! personality routine the prebuilt `core` names. The memory routines use `rep movsb`/`rep stosb`
//! in assembly so they cannot be compiled back into calls to themselves. The panic handler is in
//! `main.rs`: it bug checks, and this module is below the bug check.

use core::arch::asm;

/// # Safety
/// C's `memcpy` contract: `n` bytes valid at both, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (the kernel never sets it). Quadwords first
    // (the dump's pages and chunks are large), then the remaining bytes.
    unsafe {
        asm!(
            "rep movsq",
            "mov rcx, {rest}",
            "rep movsb",
            rest = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    };
    dest
}

/// # Safety
/// C's `memmove` contract: `n` bytes valid at both; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest is below src or the ranges are disjoint.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: copy backwards (DF set for the copy only, cleared again) for dest above src.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            )
        };
        dest
    }
}

/// # Safety
/// C's `memset` contract: `n` bytes valid at `dest`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// C's `memcmp` contract: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both buffers per the contract.
        let (x, y) =
            unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// As `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// C's `strlen` contract: `s` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller's contract: every byte up to the NUL is readable.
    while unsafe { core::ptr::read_volatile(s.add(n)) } != 0 {
        n += 1;
    }
    n
}

/// The prebuilt `core` is compiled with unwinding tables that name `rust_eh_personality`. With
/// `panic = "abort"` nothing ever unwinds, so the personality routine is never called; it only
/// has to exist for the link. Reaching it would be a kernel bug, so it halts.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {
    crate::cpu::halt_forever()
}
