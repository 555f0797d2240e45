//! Readiness for systemd (`Type=notify`): once its socket listens, crashmon-device sends READY=1
//! to `$NOTIFY_SOCKET`.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn ready_is_sent_once_the_socket_listens() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let socket = dir.path().join("card.sock");
    let mut child = Command::new(common::BIN)
        .arg("--socket")
        .arg(&socket)
        .arg("--output-dir")
        .arg(dir.path().join("dumps"))
        .args(["--vm-name", "notify", "--socket-mode", "0660"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut buf = [0u8; 4096];
    let received = notify.recv(&mut buf);
    // What the socket looks like the moment READY=1 arrives, before anything else can change.
    let meta = std::fs::symlink_metadata(&socket);
    let connected = UnixStream::connect(&socket);
    let _ = child.kill();
    let _ = child.wait();

    let len = received.expect("no notification from crashmon-device within 20 s");
    let message = String::from_utf8_lossy(&buf[..len]);
    assert!(message.lines().any(|l| l == "READY=1"), "notification {message:?}");
    let meta = meta.expect("READY=1 came before the socket existed");
    assert!(meta.file_type().is_socket(), "{} is not a socket", socket.display());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "READY=1 came before --socket-mode");
    connected.expect("the socket did not accept a connection after READY=1");
}
