//! The real device-model process against a hostile vfio-user client (a QEMU the guest has
//! compromised): raw bytes over the socket. After each attack the process must still be
//! running and serve the card to a well-behaved client.

mod common;

use common::*;
use crashmon_card_abi::{self as abi, regs};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};
use vfio_user::Client;

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_REGION_INFO: u16 = 5;
const GET_IRQ_INFO: u16 = 7;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DEVICE_RESET: u16 = 13;

const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const EINVAL: u32 = 22;

/// Longer than the server's handshake timeout (5 s), with room for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// A vfio-user header: msg_id, command, size of the whole message, flags, error.
fn header(id: u16, command: u16, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&command.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // a command
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// A message whose header size matches its payload.
fn message(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = header(id, command, 16 + payload.len() as u32);
    m.extend_from_slice(payload);
    m
}

/// VERSION 0.1 with these capability bytes (NUL included or not, as given).
fn version(id: u16, caps: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 0, 1, 0];
    payload.extend_from_slice(caps);
    message(id, VERSION, &payload)
}

fn good_version(id: u16) -> Vec<u8> {
    version(id, b"{\"capabilities\":{\"max_msg_fds\":8}}\0")
}

fn region_access(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p
}

fn words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A raw connection to the card's socket.
struct Raw(UnixStream);

impl Raw {
    fn connect(dev: &Device) -> Raw {
        let s = UnixStream::connect(&dev.socket).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        Raw(s)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// The next reply: (msg_id, command, flags, error, payload).
    fn reply(&mut self) -> (u16, u16, u32, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).expect("a reply");
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let size = word(4) as usize;
        assert!((16..=2 << 20).contains(&size), "reply size {size}");
        let mut payload = vec![0u8; size - 16];
        self.0.read_exact(&mut payload).unwrap();
        let id = u16::from_le_bytes([h[0], h[1]]);
        let command = u16::from_le_bytes([h[2], h[3]]);
        (id, command, word(8), word(12), payload)
    }

    /// Expects an error reply to message `id` carrying `errno`.
    fn expect_error(&mut self, id: u16, errno: u32) {
        let (rid, _, flags, error, payload) = self.reply();
        assert_eq!(rid, id, "reply to the wrong message");
        assert_eq!(flags, FLAG_REPLY | FLAG_ERROR, "message {id}: not an error reply");
        assert_eq!(error, errno, "message {id}");
        assert!(payload.is_empty());
    }

    /// Expects a successful reply to message `id`, returning its payload.
    fn expect_ok(&mut self, id: u16) -> Vec<u8> {
        let (rid, _, flags, error, payload) = self.reply();
        assert_eq!(rid, id, "reply to the wrong message");
        assert_eq!(flags, FLAG_REPLY, "message {id}: error {error}");
        payload
    }

    /// Waits until the server closes the connection, skipping any replies before that.
    fn expect_closed(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "the server kept a hostile connection open");
            match self.0.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }
}

/// The process is still up, and a well-behaved client gets the card within PATIENCE: the
/// vfio-user handshake, the region table, and the MAGIC register.
fn assert_card_served(dev: &mut Device, after: &str) {
    assert!(
        dev.child.try_wait().unwrap().is_none(),
        "device model exited after {after}:\n{}",
        dev.log()
    );
    // vfio_user::Client has no timeouts: it runs on a thread so that a server that never
    // answers fails the test instead of hanging it.
    let socket = dev.socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let magic = Client::new(&socket).map_err(|e| e.to_string()).and_then(|mut client| {
            let mut magic = [0u8; 4];
            client
                .region_read(VFIO_PCI_BAR0_REGION_INDEX, regs::MAGIC as u64, &mut magic)
                .map_err(|e| e.to_string())?;
            client.shutdown().map_err(|e| e.to_string())?;
            Ok(u32::from_le_bytes(magic))
        });
        let _ = tx.send(magic);
    });
    let magic = match rx.recv_timeout(PATIENCE) {
        Ok(Ok(magic)) => magic,
        Ok(Err(e)) => panic!("no card for a good client after {after}: {e}\n{}", dev.log()),
        Err(_) => panic!("a good client got no answer after {after}:\n{}", dev.log()),
    };
    assert_eq!(magic, abi::MAGIC_VALUE, "after {after}");
    assert_eq!(magic, u32::from_le_bytes(*b"CMON"));
    assert!(!dev.log().contains("panicked"), "after {after}:\n{}", dev.log());
}

#[test]
fn version_without_nul_gets_an_error_and_the_card_stays() {
    let mut dev = Device::start(&[]);
    let mut raw = Raw::connect(&dev);
    raw.send(&version(1, b"{\"capabilities\":{}}"));
    raw.expect_error(1, EINVAL);
    // The same connection goes on: a proper VERSION is then accepted.
    raw.send(&good_version(2));
    let caps = raw.expect_ok(2);
    assert_eq!(caps.last(), Some(&0), "server capabilities end in NUL");
    drop(raw);
    assert_card_served(&mut dev, "a VERSION without its NUL");
}

#[test]
fn broken_framing_drops_only_that_connection() {
    let mut dev = Device::start(&[]);

    // Garbage header: an enormous size the server must neither allocate nor wait for.
    let mut raw = Raw::connect(&dev);
    raw.send(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0x5a, 0x5a, 0x5a, 0x5a, 1, 2, 3, 4]);
    raw.expect_closed();
    assert_card_served(&mut dev, "a garbage header");

    // A header whose size is smaller than a header.
    let mut raw = Raw::connect(&dev);
    raw.send(&good_version(1));
    raw.expect_ok(1);
    raw.send(&header(2, DEVICE_RESET, 4));
    raw.expect_closed();
    assert_card_served(&mut dev, "a message size below the header");

    // Half a header, then EOF.
    let mut raw = Raw::connect(&dev);
    raw.send(&header(1, VERSION, 64)[..7]);
    raw.0.shutdown(Shutdown::Write).unwrap();
    raw.expect_closed();
    assert_card_served(&mut dev, "half a header then EOF");

    // A message cut short: the header promises 4 KiB, 10 bytes come, then EOF.
    let mut raw = Raw::connect(&dev);
    raw.send(&good_version(1));
    raw.expect_ok(1);
    raw.send(&header(2, REGION_WRITE, 4096));
    raw.send(&[0; 10]);
    raw.0.shutdown(Shutdown::Write).unwrap();
    raw.expect_closed();
    assert_card_served(&mut dev, "a message cut short");

    // VERSION claiming 4 GiB of capabilities.
    let mut raw = Raw::connect(&dev);
    raw.send(&[header(1, VERSION, u32::MAX), vec![0, 0, 1, 0]].concat());
    raw.expect_closed();
    assert_card_served(&mut dev, "a 4 GiB VERSION");
}

#[test]
fn malformed_commands_get_errors_on_a_connection_that_goes_on() {
    let mut dev = Device::start(&[]);
    let mut raw = Raw::connect(&dev);

    // Commands before VERSION.
    raw.send(&message(1, REGION_READ, &region_access(VFIO_PCI_BAR0_REGION_INDEX, 0, 4)));
    raw.expect_error(1, EINVAL);
    // VERSION shorter than its structure; capabilities without their NUL, in invalid UTF-8,
    // or of the wrong JSON type.
    raw.send(&message(2, VERSION, &[0, 0]));
    raw.expect_error(2, EINVAL);
    raw.send(&version(3, b"{"));
    raw.expect_error(3, EINVAL);
    raw.send(&version(4, b"\xff\xfe{}\0"));
    raw.expect_error(4, EINVAL);
    raw.send(&version(5, b"{\"capabilities\":{\"max_msg_fds\":\"many\"}}\0"));
    raw.expect_error(5, EINVAL);
    raw.send(&good_version(6));
    raw.expect_ok(6);

    // Region accesses: any index, a huge or wrapping count, a write whose data does not
    // match its count.
    let bar0 = VFIO_PCI_BAR0_REGION_INDEX;
    raw.send(&message(7, REGION_READ, &region_access(bar0, 0, u32::MAX)));
    raw.expect_error(7, EINVAL);
    raw.send(&message(8, REGION_READ, &region_access(u32::MAX, 0, 4)));
    raw.expect_error(8, EINVAL);
    raw.send(&message(9, REGION_READ, &region_access(bar0, u64::MAX - 1, 4)));
    raw.expect_error(9, EINVAL);
    let mut write = region_access(bar0, regs::MAGIC as u64, u32::MAX);
    write.extend_from_slice(&[1, 2, 3, 4]);
    raw.send(&message(10, REGION_WRITE, &write));
    raw.expect_error(10, EINVAL);
    raw.send(&message(11, REGION_READ, &[0; 6]));
    raw.expect_error(11, EINVAL);

    // Info queries with a bad index or argsz.
    raw.send(&message(12, GET_REGION_INFO, &words(&[32, 0, 9999, 0, 0, 0, 0, 0])));
    raw.expect_error(12, EINVAL);
    raw.send(&message(13, GET_REGION_INFO, &words(&[4, 0, 0, 0, 0, 0, 0, 0])));
    raw.expect_error(13, EINVAL);
    raw.send(&message(14, GET_IRQ_INFO, &words(&[16, 0, 9999, 0])));
    raw.expect_error(14, EINVAL);
    // SET_IRQS beyond the index's interrupts; DMA_MAP/UNMAP with a short argsz.
    raw.send(&message(15, SET_IRQS, &words(&[20, 0x24, 0, u32::MAX, 2])));
    raw.expect_error(15, EINVAL);
    raw.send(&message(16, DMA_MAP, &[words(&[4, 3]), vec![0; 24]].concat()));
    raw.expect_error(16, EINVAL);
    raw.send(&message(17, DMA_UNMAP, &[words(&[4, 0]), vec![0; 16]].concat()));
    raw.expect_error(17, EINVAL);
    // Unknown and unsupported commands with payloads, which must be skipped whole.
    for (id, command) in [(18, 0x7777), (19, 0), (20, 6), (21, 11)] {
        raw.send(&message(id, command, &[0xff; 40]));
        let (rid, _, flags, error, _) = raw.reply();
        assert_eq!((rid, flags & FLAG_ERROR), (id, FLAG_ERROR));
        assert_ne!(error, 0, "an error reply carries an errno");
    }
    // A reset with trailing bytes.
    raw.send(&message(22, DEVICE_RESET, &[1, 2, 3]));
    raw.expect_ok(22);

    // The stream is still in step: the card answers on this very connection.
    raw.send(&message(23, REGION_READ, &region_access(bar0, regs::MAGIC as u64, 4)));
    let reply = raw.expect_ok(23);
    assert_eq!(reply[16..], abi::MAGIC_VALUE.to_le_bytes());
    raw.send(&message(24, REGION_READ, &region_access(VFIO_PCI_CONFIG_REGION_INDEX, 0, 2)));
    let reply = raw.expect_ok(24);
    assert_eq!(reply[16..], abi::PCI_VENDOR_ID.to_le_bytes());
    drop(raw);
    assert_card_served(&mut dev, "malformed commands");
}

#[test]
fn silent_and_trickling_clients_are_dropped_after_the_handshake_timeout() {
    let mut dev = Device::start(&[]);

    // Connects and sends nothing: a well-behaved client waiting behind it gets the card
    // once the handshake timeout drops it.
    let started = Instant::now();
    let mut silent = Raw::connect(&dev);
    assert_card_served(&mut dev, "a silent connection");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(4), "the silent client was dropped after {waited:?}");
    silent.expect_closed();

    // Half a header, then silence.
    let mut half = Raw::connect(&dev);
    half.send(&header(1, VERSION, 64)[..9]);
    half.expect_closed();
    assert_card_served(&mut dev, "half a header then silence");

    // VERSION a byte every 300 ms: trickling cannot extend the handshake.
    let mut trickle = Raw::connect(&dev);
    let started = Instant::now();
    for byte in good_version(1) {
        if trickle.0.write_all(&[byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    trickle.expect_closed();
    assert!(started.elapsed() < PATIENCE);
    assert_card_served(&mut dev, "a trickled VERSION");
    assert!(dev.log().contains("VERSION exchange"), "{}", dev.log());
}
