//! The files of qemu-config/ that the host's system tools read: the systemd unit must pass
//! `systemd-analyze verify`, rate 2.0 or less in `systemd-analyze security`, and start the real
//! crashmon-device with its own command line; the libvirt snippet, merged into a domain, must
//! pass `virt-xml-validate` against libvirt's schemas.
//!
//! The tools come from Debian's `systemd` and `libvirt-clients` + `libxml2-utils` packages, which
//! `./crashmon setup` installs (APT_PACKAGES).

use crashmon_harness::workspace_root;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const UNIT: &str = "qemu-config/crashmon-device@.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/crashmon-device";
const SNIPPET: &str = "qemu-config/libvirt-domain-snippet.xml";

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} (see ./crashmon setup): {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The unit as an instance for VM `vm` in a temporary folder, its ExecStart naming the device
/// model this workspace builds instead of the installed one.
fn instance(dir: &Path, vm: &str) -> PathBuf {
    let unit = read(UNIT);
    assert_eq!(unit.matches(INSTALLED_BINARY).count(), 1, "the unit runs {INSTALLED_BINARY}");
    let binary = crashmon_harness::device::locate_binary().expect("crashmon-device");
    let path = dir.join(format!("crashmon-device@{vm}.service"));
    std::fs::write(&path, unit.replace(INSTALLED_BINARY, binary.to_str().unwrap())).unwrap();
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = instance(dir.path(), "myvm");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{said}");
    // verify exits 0 on settings it ignores (unknown keys, bad values): it must say nothing.
    assert!(said.trim().is_empty(), "systemd-analyze verify warns:\n{said}");

    // It does look at the binary: a unit naming a missing one fails.
    let missing = dir.path().join("crashmon-device@other.service");
    std::fs::write(&missing, read(UNIT).replace(INSTALLED_BINARY, "/nonexistent/crashmon-device"))
        .unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&missing));
    assert!(!out.status.success(), "verify passed a unit with no binary:\n{}", text(&out));
}

#[test]
fn unit_exposure_is_at_most_2() {
    let dir = tempfile::tempdir().unwrap();
    let unit = instance(dir.path(), "myvm");
    let out = run(Command::new("systemd-analyze").arg("security").arg("--offline=true").arg(&unit));
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze security failed:\n{said}");
    // "→ Overall exposure level for crashmon-device@myvm.service: 0.7 SAFE 😀"
    let line = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{said}"));
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{said}");
}

/// The unit's ExecStart, with its paths and the kvm group moved to ones this test owns, starts
/// the real device model, which reports READY=1 as Type=notify expects.
#[test]
fn unit_command_line_starts_the_device_model() {
    let unit = read(UNIT);
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart= line");
    assert!(unit.lines().any(|l| l == "Type=notify"), "the unit waits for READY=1");

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("myvm.sock");
    let group = nix::unistd::getegid().as_raw().to_string();
    let words: Vec<String> = exec
        .split_whitespace()
        .skip(1) // the binary
        .map(|w| match w {
            "/run/crashmon/%i.sock" => socket.to_str().unwrap().to_owned(),
            "/var/lib/crashmon/dumps" => dir.path().join("dumps").to_str().unwrap().to_owned(),
            // QEMU's group under libvirt, which this machine may not have.
            "kvm" => group.clone(),
            other => other.replace("%i", "myvm"),
        })
        .collect();
    assert!(!words.iter().any(|w| w.contains('%')), "unexpanded specifier in {words:?}");

    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let binary = crashmon_harness::device::locate_binary().expect("crashmon-device");
    let log = dir.path().join("device.log");
    let mut child = Command::new(binary)
        .args(&words)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let received = notify.recv(&mut buf);
    let mode = std::fs::symlink_metadata(&socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let len = received.unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{words:?}\n{log}"));
    assert_eq!(&buf[..len], b"READY=1\n", "{log}");
    assert_eq!(mode.ok(), Some(0o660), "QEMU's group can connect to the socket: {log}");
}

/// A minimal domain with the snippet merged in: the snippet's `<domain>` element (its namespace
/// declaration and children) with the domain's own name, memory and OS put where its
/// placeholder comment stands, and VMNAME replaced.
fn merged_domain(snippet: &str) -> String {
    // Its comment mentions <domain> too: the element is the line that starts with it.
    let start = snippet.find("\n<domain ").expect("the snippet has a <domain> element");
    let domain = &snippet[start + 1..];
    let placeholder = "<!-- ... the domain's own name, memory, devices ... -->";
    assert!(domain.contains(placeholder), "the snippet marks where the domain's own parts go");
    let own = "<name>myvm</name>\n  <memory unit='MiB'>1024</memory>\n  \
               <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <devices/>";
    domain.replace(placeholder, own).replace("VMNAME", "myvm")
}

fn validate(dir: &Path, name: &str, xml: &str) -> Output {
    let path = dir.join(name);
    std::fs::write(&path, xml).unwrap();
    run(Command::new("virt-xml-validate").arg(&path).arg("domain"))
}

#[test]
fn libvirt_snippet_merged_into_a_domain_validates() {
    let dir = tempfile::tempdir().unwrap();
    let domain = merged_domain(&read(SNIPPET));
    let out = validate(dir.path(), "domain.xml", &domain);
    assert!(out.status.success(), "virt-xml-validate:\n{}\n{domain}", text(&out));
    assert!(domain.contains("/run/crashmon/myvm.sock"), "{domain}");

    // The schema does check what the snippet adds: a bad memory source is refused.
    let broken = domain.replace("<source type='memfd'/>", "<source type='no-such'/>");
    assert_ne!(broken, domain);
    let out = validate(dir.path(), "broken.xml", &broken);
    assert!(!out.status.success(), "virt-xml-validate passed:\n{broken}");
}
