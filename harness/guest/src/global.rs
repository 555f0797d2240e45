//! # Global: a `static` cell for a one-processor kernel
//!
//! The guest runs on one processor and never enables maskable interrupts; the only asynchronous
//! entries are exceptions and NMIs, and they never return into the code they interrupted (each
//! one ends in a bug check). So a global is only ever touched by one flow of control at a time,
//! and an `UnsafeCell` with a `Sync` promise is enough. Every access is still `unsafe` and says
//! why it cannot overlap another.

use core::cell::UnsafeCell;

/// A global value mutated without locks; see the module documentation.
#[repr(transparent)]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: one processor, and no handler returns into interrupted code (module documentation),
// so no two accesses overlap.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// A global holding `value`.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the value.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }

    /// Exclusive access to the value.
    ///
    /// # Safety
    /// No other reference to the value may be live while the returned one is.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut(&self) -> &mut T {
        // SAFETY: exclusivity is the caller's promise.
        unsafe { &mut *self.0.get() }
    }
}
