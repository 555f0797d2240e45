//! Shared rig for the integration tests: the real `crashmon-device` process, and a vfio-user
//! client that maps BAR2 from the fd the server hands out, the way QEMU does.

#![allow(dead_code)]

use crashmon_card_abi as abi;
use crashmon_device_model::capture::Sidecar;
use crashmon_guest_driver::CardIo;
use memmap2::{MmapOptions, MmapRaw};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX};
use vfio_user::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_crashmon-device");

/// A running device model with its own socket and output folder.
pub struct Device {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub out: PathBuf,
}

impl Device {
    pub fn start(extra: &[&str]) -> Device {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// [`Device::start`] with more environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let (socket, out) = (dir.path().join("card.sock"), dir.path().join("dumps"));
        Self::spawn(dir, &socket, &out, extra, env)
    }

    /// Starts a device model whose output folder is `dir/dumps` (which may already hold files).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Device {
        let socket = dir.path().join("card.sock");
        let out = dir.path().join("dumps");
        Self::start_at(dir, &socket, &out, extra)
    }

    /// Starts a device model on `socket` writing to `out`; `dir` holds its log.
    pub fn start_at(dir: tempfile::TempDir, socket: &Path, out: &Path, extra: &[&str]) -> Device {
        Self::spawn(dir, socket, out, extra, &[])
    }

    fn spawn(
        dir: tempfile::TempDir,
        socket: &Path,
        out: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Device {
        let (socket, out) = (socket.to_owned(), out.to_owned());
        let child = Command::new(BIN)
            .envs(env.iter().copied())
            .arg("--socket")
            .arg(&socket)
            .arg("--output-dir")
            .arg(&out)
            .args(["--vm-name", "itest"])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("device.log")).unwrap()))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "device model never created its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Device { child, dir, socket, out }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("device.log")).unwrap_or_default()
    }

    /// Waits for the process to exit (it runs with --once), returning its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "device model did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most 20 s) until `count` files end with `suffix`, and returns them.
    pub fn wait_files(&self, suffix: &str, count: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let files = self.files(suffix);
            if files.len() >= count || Instant::now() > deadline {
                return files;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Dumps (not sidecars) in the output folder, sorted by name.
    pub fn files(&self, suffix: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(suffix))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sidecar beside a dump file.
pub fn sidecar_of(dump: &Path) -> Sidecar {
    let name = dump.file_name().unwrap().to_str().unwrap();
    let base = name.trim_end_matches(".incomplete.dmp").trim_end_matches(".dmp");
    let path = dump.with_file_name(format!("{base}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The card as a vfio-user client sees it: registers over the socket, BAR2 mapped from the
/// server's fd, exactly as QEMU maps it for the guest.
pub struct VfioCard {
    pub client: RefCell<Client>,
    pub window: MmapRaw,
}

impl VfioCard {
    pub fn connect(socket: &Path) -> VfioCard {
        let client = Client::new(socket).expect("vfio-user handshake");
        let region = client.region(VFIO_PCI_BAR2_REGION_INDEX).expect("BAR2 region");
        assert_eq!(region.size, abi::BAR2_SIZE);
        assert_eq!(region.sparse_areas.len(), 1, "BAR2 is one sparse-mmap area");
        assert_eq!(region.sparse_areas[0].offset, 0);
        assert_eq!(region.sparse_areas[0].size, abi::BAR2_SIZE);
        let fo = region.file_offset.as_ref().expect("BAR2 comes with an fd");
        let window = MmapOptions::new()
            .offset(fo.start())
            .len(abi::BAR2_SIZE as usize)
            .map_raw(fo.file())
            .unwrap();
        VfioCard { client: RefCell::new(client), window }
    }
}

impl CardIo for &VfioCard {
    fn read_register(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .borrow_mut()
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset as u64, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }
    fn write_register(&self, offset: u32, value: u32) {
        self.client
            .borrow_mut()
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset as u64, &value.to_le_bytes())
            .unwrap();
    }
    fn write_window(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= abi::BAR2_SIZE as usize);
        // SAFETY: in bounds (asserted), and the mapping is plain shared bytes that no Rust
        // reference in this process aliases.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.window.as_mut_ptr().add(offset),
                data.len(),
            )
        }
    }
}

/// A synthetic dump: a DUMP_HEADER64-like header page with a bug check in it, then a body of
/// pseudo-random bytes (xorshift, so every byte is known and no two pages are alike).
pub fn synthetic_dump(size: usize, code: u32, params: [u64; 4]) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ size as u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    data[..8].copy_from_slice(b"PAGEDU64");
    data[0x38..0x3C].copy_from_slice(&code.to_le_bytes());
    for (i, p) in params.iter().enumerate() {
        data[0x40 + 8 * i..0x48 + 8 * i].copy_from_slice(&p.to_le_bytes());
    }
    data
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the binary with `args` and returns its output.
pub fn run_cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}
