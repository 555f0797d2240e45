//! The `vfio_messages` target: a hostile vfio-user client (QEMU, or whatever holds the socket)
//! sends raw bytes to the real `vfio_user::Server` serving the real [`CardBackend`].
//!
//! The crate serves connections from a listener only, so each input gets a listener in a tmpfs
//! folder ([`vfio_user::Server::from_owned_fd`]), a client that connects to it, and the server
//! loop on this thread until the client's bytes run out. The input's first byte is for the
//! harness: bit 0 sends a memfd (as a DMA map's or an interrupt's fd would come) with the first
//! `16 + 4 * (byte >> 1)` bytes; the rest is the byte stream.
//!
//! Invariants: no panic in the device model's code; nothing written outside the output folder;
//! every sidecar parses; no dump past the maximum size.
//!
//! Panics inside the `vfio_user` crate itself (in the server loop but not in the card's
//! backend; found by this target: see SECURITY.md) are tolerated and reported once per place
//! by default, so that the target keeps exploring the
//! backend behind them; `CRASHMON_FUZZ_VFIO_PANICS=abort` makes them crashes like any other,
//! which is what `fuzz/run.sh` should use once the hardened crate is in.

use crate::Input;
use crashmon_device_model::capture::{CaptureConfig, Sidecar};
use crashmon_device_model::card::CrashMonitorCard;
use crashmon_device_model::data_window::DataWindow;
use crashmon_device_model::vfio::{self, CardBackend};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::collections::HashSet;
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, Once};
use vfio_user::ServerBackend;

const MAX_DUMP_SIZE: u64 = 65536;

/// Installs the panic policy described in the module documentation (once per process), and
/// ignores SIGPIPE: under libFuzzer Rust's own startup does not run, and a write to a client
/// that went away must be an error, not the end of the process.
fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigIgn,
            );
        }
        let abort = std::env::var("CRASHMON_FUZZ_VFIO_PANICS").is_ok_and(|v| v == "abort");
        if abort {
            return;
        }
        let seen = Mutex::new(HashSet::new());
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            let in_crate = IN_SERVER.with(|c| c.get()) && !IN_BACKEND.with(|c| c.get());
            if in_crate {
                if seen.lock().unwrap_or_else(|p| p.into_inner()).insert(location.clone()) {
                    eprintln!(
                        "crashmon-fuzz: tolerated a panic inside the vfio_user crate: {info}"
                    );
                }
                return; // unwinds to the catch_unwind around the server loop
            }
            previous(info)
        }));
    });
}

thread_local! {
    /// Whether this thread is in the server loop, and whether it is in the card's backend.
    static IN_SERVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static IN_BACKEND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks a scope on this thread; unmarks it when dropped (also while unwinding).
struct Mark(&'static std::thread::LocalKey<std::cell::Cell<bool>>);

impl Mark {
    fn new(key: &'static std::thread::LocalKey<std::cell::Cell<bool>>) -> Self {
        key.with(|c| c.set(true));
        Self(key)
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.0.with(|c| c.set(false));
    }
}

/// The card's backend, marking when the server loop is inside it: a panic in the loop but
/// outside the backend is the crate's own.
struct Marked(CardBackend);

impl ServerBackend for Marked {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.region_read(region, offset, data)
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.region_write(region, offset, data)
    }
    fn dma_map(
        &mut self,
        flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<std::fs::File>,
    ) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.dma_map(flags, offset, address, size, fd)
    }
    fn dma_unmap(
        &mut self,
        flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.dma_unmap(flags, address, size)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.reset()
    }
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<std::fs::File>,
    ) -> std::io::Result<()> {
        let _m = Mark::new(&IN_BACKEND);
        self.0.set_irqs(index, flags, start, count, fds)
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    init();
    let root = crate::scratch_root("vfio");
    let out = root.join("out");
    crate::fresh_dir(&out);
    let mut input = Input::new(data);
    let control = input.u8();
    let stream = input.rest().to_vec();

    let config = CaptureConfig {
        limits: crate::NO_LIMITS,
        ..CaptureConfig::new(&out, "fuzz", MAX_DUMP_SIZE)
    };
    let card =
        Arc::new(Mutex::new(CrashMonitorCard::new(config, DataWindow::new().expect("memfd"))));
    let socket = root.join("card.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).expect("bind the fuzzer's socket");
    let server = vfio_user::Server::from_owned_fd(
        OwnedFd::from(listener),
        true,
        vfio::irqs(),
        vfio::regions(&card),
    );
    let client = UnixStream::connect(&socket).expect("connect to the fuzzer's socket");
    let mut replies = client.try_clone().expect("dup");
    // Replies are read as they come, so that a server writing a big reply never waits for a
    // client that is still writing.
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(replies.read(&mut buf), Ok(n) if n > 0) {}
    });
    let feed = std::thread::spawn(move || {
        let mut at = 0;
        if control & 1 != 0 {
            let first = (16 + 4 * (control as usize >> 1)).min(stream.len());
            let memfd = nix::sys::memfd::memfd_create(
                c"fuzz-dma",
                nix::sys::memfd::MemFdCreateFlag::empty(),
            )
            .expect("memfd");
            let _ = nix::unistd::ftruncate(&memfd, 1 << 16);
            let fds = [memfd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [IoSlice::new(&stream[..first])];
            match sendmsg::<()>(client.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => at = n,
                Err(_) => return,
            }
        }
        while at < stream.len() {
            match nix::sys::socket::send(client.as_raw_fd(), &stream[at..], MsgFlags::MSG_NOSIGNAL)
            {
                Ok(n) if n > 0 => at += n,
                _ => break,
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
    });

    let mut backend = Marked(CardBackend::new(card.clone()));
    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
        let _m = Mark::new(&IN_SERVER);
        server.run(&mut backend)
    }));
    // As crashmon-device does when a VM goes away.
    backend.0.disconnected();
    drop(server);
    feed.join().expect("feeder");
    drain.join().expect("drain");
    let writers = vfio::lock(&card).take_writers();
    for w in writers {
        w.join();
    }

    for name in crate::names(&root) {
        assert!(name == "out" || name == "card.sock", "{name} written outside the output folder");
    }
    for name in crate::names(&out) {
        let path = out.join(&name);
        let len = std::fs::metadata(&path).unwrap().len();
        if name.ends_with(".json") {
            let _: Sidecar = serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
        } else {
            assert!(len <= MAX_DUMP_SIZE, "{name}: {len} bytes past the maximum");
        }
    }
}

/// vfio-user message builders for the seed corpus.
pub mod msg {
    /// Command numbers.
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DEVICE_RESET: u16 = 13;

    /// A message: header (id, command, size, flags 0, error 0), then `body`.
    pub fn message(id: u16, command: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(id.to_le_bytes());
        m.extend(command.to_le_bytes());
        m.extend(((16 + body.len()) as u32).to_le_bytes());
        m.extend(0u32.to_le_bytes());
        m.extend(0u32.to_le_bytes());
        m.extend(body);
        m
    }

    /// VERSION 0.1 with QEMU's capabilities JSON, NUL-terminated.
    pub fn version(id: u16) -> Vec<u8> {
        let mut body = vec![0, 0, 1, 0];
        body.extend(br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#);
        body.push(0);
        message(id, VERSION, &body)
    }

    /// argsz, then u32 fields.
    pub fn words(id: u16, command: u16, words: &[u32]) -> Vec<u8> {
        let body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        message(id, command, &body)
    }

    /// A region access: offset, region, count (and the data for a write).
    pub fn region(
        id: u16,
        command: u16,
        region: u32,
        offset: u64,
        count: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend(offset.to_le_bytes());
        body.extend(region.to_le_bytes());
        body.extend(count.to_le_bytes());
        body.extend(data);
        message(id, command, &body)
    }

    /// A DMA map of `size` bytes at `address`.
    pub fn dma_map(id: u16, address: u64, size: u64) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend(32u32.to_le_bytes());
        body.extend(3u32.to_le_bytes());
        body.extend(0u64.to_le_bytes());
        body.extend(address.to_le_bytes());
        body.extend(size.to_le_bytes());
        message(id, DMA_MAP, &body)
    }
}
