//! Launching QEMU with the card attached, from the argument files in `qemu-config/`.
//!
//! `crashmon-vm.args` describes the harness's VM (q35, TCG, QMP, serial to a file) and
//! `crashmon-card.args` the options that attach the card, which users copy into their own VMs.
//! Both are compiled into the harness; see `qemu-config/README.md` for their format.

use crate::qemu::Qemu;
use crate::qmp::{QmpClient, QmpError};
use log::info;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::process::{ProcessError, Supervised};

/// The options that attach the card (`qemu-config/crashmon-card.args`).
pub const CARD_ARGS: &str = include_str!("../../qemu-config/crashmon-card.args");
/// The harness's VM without the card (`qemu-config/crashmon-vm.args`).
pub const VM_ARGS: &str = include_str!("../../qemu-config/crashmon-vm.args");

/// What went wrong launching or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// An argument file is malformed or names an unknown placeholder.
    #[error("argument template, line {line}: {reason}")]
    Template { line: usize, reason: String },
    /// A path cannot be written into QEMU's option syntax.
    #[error("{what} {path} cannot be passed to QEMU: it contains {bad:?}")]
    UnsuitablePath { what: &'static str, path: PathBuf, bad: char },
    /// QEMU could not be started.
    #[error("cannot start QEMU")]
    Spawn(#[source] io::Error),
    /// QEMU exited while the harness still needed it.
    #[error("QEMU exited ({status}); last lines of its log {log}:\n{tail}")]
    Exited { status: ExitStatus, log: PathBuf, tail: String },
    /// Waiting for QEMU failed, or QEMU did not exit in time.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Talking to QEMU failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Another I/O error.
    #[error("{context}")]
    Io { context: String, source: io::Error },
}

/// Renders an argument file: the arguments of each option line, in order.
///
/// Each line that is neither blank nor a comment is an option, optionally followed by one space
/// and its value (a single argument, which may contain spaces). `@NAME@` in a value is replaced
/// by `values[NAME]`; a line naming a value that is `None` is left out; an unknown name is an
/// error.
pub fn render(
    template: &str,
    values: &[(&str, Option<&str>)],
) -> Result<Vec<Vec<String>>, VmError> {
    let mut lines = Vec::new();
    'lines: for (number, line) in template.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let error = |reason: String| VmError::Template { line: number + 1, reason };
        let (option, value) = match line.split_once(' ') {
            Some((option, value)) => (option, Some(value)),
            None => (line, None),
        };
        if !option.starts_with('-') {
            return Err(error(format!("{option:?} is not an option")));
        }
        let mut args = vec![option.to_owned()];
        if let Some(value) = value {
            let mut rendered = String::new();
            let mut rest = value;
            while let Some(start) = rest.find('@') {
                let end = rest[start + 1..]
                    .find('@')
                    .ok_or_else(|| error(format!("unclosed '@' in {value:?}")))?;
                let name = &rest[start + 1..start + 1 + end];
                let Some((_, given)) = values.iter().find(|(n, _)| *n == name) else {
                    return Err(error(format!("unknown placeholder @{name}@")));
                };
                let Some(given) = given else { continue 'lines };
                rendered.push_str(&rest[..start]);
                rendered.push_str(given);
                rest = &rest[start + end + 2..];
            }
            rendered.push_str(rest);
            args.push(rendered);
        }
        lines.push(args);
    }
    Ok(lines)
}

/// The empty folder `crashmon-card.args` names for the node that makes QEMU refuse live
/// migration, on a host set up with the systemd unit (its `ExecStartPre` makes it).
pub const DEFAULT_NO_MIGRATION_DIR: &str = "/run/crashmon/no-migration";

/// The card's options for a VM with `memory_mb` MiB of RAM and the device model on `socket`,
/// one option (with its value) per entry. With `no_migration` (an empty folder), QEMU refuses
/// to live-migrate the VM, which would lose the card (see `crashmon-card.args`).
pub fn card_args(
    socket: &Path,
    memory_mb: u32,
    no_migration: Option<&Path>,
) -> Result<Vec<Vec<String>>, VmError> {
    let socket = qemu_path("the card socket", socket)?;
    let no_migration = match no_migration {
        Some(dir) => Some(qemu_path("the no-migration folder", dir)?),
        None => None,
    };
    render(
        CARD_ARGS,
        &[
            ("SOCKET", Some(socket)),
            ("MEM", Some(&memory_mb.to_string())),
            ("NO_MIGRATION_DIR", no_migration),
        ],
    )
}

/// Formats option lines for a shell, one option per line joined by backslash-newlines.
pub fn shell_lines(lines: &[Vec<String>]) -> String {
    lines
        .iter()
        .map(|args| args.iter().map(|a| crate::shell_quote(a)).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" \\\n")
}

/// `path` as a string that is safe inside QEMU's option syntax (where ',' separates options)
/// and the JSON of `-device`.
fn qemu_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, VmError> {
    let text = path.to_str().ok_or(VmError::UnsuitablePath {
        what,
        path: path.to_owned(),
        bad: '\u{fffd}',
    })?;
    match text.chars().find(|c| matches!(c, ',' | '"' | '\\') || c.is_control()) {
        Some(bad) => Err(VmError::UnsuitablePath { what, path: path.to_owned(), bad }),
        None => Ok(text),
    }
}

fn optional_qemu_path<'a>(
    what: &'static str,
    path: &'a Option<PathBuf>,
) -> Result<Option<&'a str>, VmError> {
    path.as_deref().map(|p| qemu_path(what, p)).transpose()
}

/// The VM the harness runs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The VM's name (QEMU's `-name`).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mb: u32,
    /// The device model's vfio-user socket.
    pub card_socket: PathBuf,
    /// Folder for the QMP socket and the QEMU and serial logs.
    pub run_dir: PathBuf,
    /// A guest kernel to boot directly; with none the VM idles in SeaBIOS.
    pub kernel: Option<PathBuf>,
    /// The kernel's initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel's command line.
    pub append: Option<String>,
    /// QEMU's `-incoming`: `Some("defer")` (or a URI such as `unix:PATH`) starts a destination
    /// of a live migration, which waits for the migration stream instead of booting.
    pub incoming: Option<String>,
    /// Whether QEMU refuses live migration (the default, as `crashmon-card.args` has it); off
    /// only to show what a migration does to the card.
    pub migration_blocker: bool,
    /// Whether guest RAM is shared with the device model (`share=on`, the default, as
    /// `crashmon-card.args` has it). Off (`share=off`), QEMU still passes the memfd but keeps
    /// the guest's writes in private copies: the card reads other bytes than the guest's, as
    /// it would behind a vIOMMU, its DMA probe fails and the driver stays in copy mode.
    pub shared_memory: bool,
}

impl VmConfig {
    /// A VM called `name` with 512 MiB of RAM and no kernel.
    pub fn new(name: &str, card_socket: &Path, run_dir: &Path) -> Self {
        VmConfig {
            name: name.to_owned(),
            memory_mb: 512,
            card_socket: card_socket.to_owned(),
            run_dir: run_dir.to_owned(),
            kernel: None,
            initrd: None,
            append: None,
            incoming: None,
            migration_blocker: true,
            shared_memory: true,
        }
    }

    /// The empty folder behind the node that blocks live migration.
    pub fn no_migration_dir(&self) -> PathBuf {
        self.run_dir.join("no-migration")
    }

    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The file receiving the guest's serial console.
    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join("serial.log")
    }

    /// The file receiving QEMU's own output.
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }

    /// QEMU's arguments: the VM's, then the card's.
    pub fn args(&self) -> Result<Vec<String>, VmError> {
        let (qmp, serial) = (self.qmp_socket(), self.serial_log());
        let values = [
            ("NAME", Some(self.name.as_str())),
            ("QMP", Some(qemu_path("the QMP socket", &qmp)?)),
            ("SERIAL", Some(qemu_path("the serial log", &serial)?)),
            ("KERNEL", optional_qemu_path("the kernel", &self.kernel)?),
            ("INITRD", optional_qemu_path("the initrd", &self.initrd)?),
            ("APPEND", self.append.as_deref()),
            ("INCOMING", self.incoming.as_deref()),
        ];
        let vm = render(VM_ARGS, &values)?;
        let no_migration = self.no_migration_dir();
        let mut card = card_args(
            &self.card_socket,
            self.memory_mb,
            self.migration_blocker.then_some(no_migration.as_path()),
        )?;
        if !self.shared_memory {
            for arg in card.iter_mut().flatten() {
                if arg.starts_with("memory-backend-memfd,") {
                    *arg = arg.replace(",share=on", ",share=off");
                }
            }
        }
        Ok(vm.into_iter().chain(card).flatten().collect())
    }
}

/// A running QEMU. Dropping it kills QEMU if it is still running.
pub struct Vm {
    process: Supervised,
    qmp_socket: PathBuf,
    serial_log: PathBuf,
}

impl Vm {
    /// Starts `qemu` with `config`'s VM. Use [`Vm::connect_qmp`] to wait until it is up.
    pub fn launch(qemu: &Qemu, config: &VmConfig) -> Result<Self, VmError> {
        let io_error = |context: String| move |source| VmError::Io { context, source };
        std::fs::create_dir_all(&config.run_dir)
            .map_err(io_error(format!("cannot create {}", config.run_dir.display())))?;
        if config.migration_blocker {
            let dir = config.no_migration_dir();
            std::fs::create_dir_all(&dir)
                .map_err(io_error(format!("cannot create {}", dir.display())))?;
        }
        let qemu_log = config.qemu_log();
        let log = File::create(&qemu_log)
            .map_err(io_error(format!("cannot create {}", qemu_log.display())))?;
        let stdout = log.try_clone().map_err(io_error("cannot duplicate the log file".into()))?;
        let mut cmd = qemu.command();
        cmd.args(config.args()?).stdin(Stdio::null()).stdout(stdout).stderr(log);
        info!("starting QEMU: {}", crate::command_line(&cmd));
        let child = cmd.spawn().map_err(VmError::Spawn)?;
        Ok(Vm {
            process: Supervised::new(child, "QEMU", qemu_log),
            qmp_socket: config.qmp_socket(),
            serial_log: config.serial_log(),
        })
    }

    /// Connects to QEMU's QMP socket, waiting up to `timeout` for QEMU to open it; fails at
    /// once, with QEMU's log, if QEMU exits meanwhile.
    pub fn connect_qmp(&mut self, timeout: Duration) -> Result<QmpClient, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(self.exited(status));
            }
            match QmpClient::connect(&self.qmp_socket, Duration::from_millis(200)) {
                Ok(client) => return Ok(client),
                Err(QmpError::Connect { .. }) if Instant::now() < deadline => {}
                Err(e) => {
                    // A connection that breaks at once usually means QEMU is exiting: say why.
                    std::thread::sleep(Duration::from_millis(200));
                    if let Some(status) = self.try_wait()? {
                        return Err(self.exited(status));
                    }
                    return Err(e.into());
                }
            }
        }
    }

    fn exited(&self, status: ExitStatus) -> VmError {
        VmError::Exited { status, log: self.log_path().to_owned(), tail: self.log_tail() }
    }

    /// The file holding QEMU's own output.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last lines of QEMU's output.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// The file receiving the guest's serial console.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// QEMU's process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// QEMU's exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        Ok(self.process.try_wait()?)
    }

    /// Waits up to `timeout` for QEMU to exit (after `quit`, or a guest shutdown).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        Ok(self.process.wait_timeout(timeout)?)
    }

    /// Kills QEMU if it is still running and reaps it (dropping a `Vm` does the same).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_substitute_values_and_drop_lines_without_one() {
        let template = "# comment\n-a @X@\n\n-b\n-c @Y@,x=@X@\n-d @Z@\n";
        let lines =
            render(template, &[("X", Some("1")), ("Y", Some("two words")), ("Z", None)]).unwrap();
        assert_eq!(lines, [vec!["-a", "1"], vec!["-b"], vec!["-c", "two words,x=1"]]);
        assert!(matches!(render("-a @W@", &[]), Err(VmError::Template { line: 1, .. })));
        assert!(matches!(
            render("\n-a @W", &[("W", Some("x"))]),
            Err(VmError::Template { line: 2, .. })
        ));
        assert!(matches!(render("a b", &[]), Err(VmError::Template { .. })));
    }

    #[test]
    fn the_card_gets_shared_memfd_ram_and_a_vfio_user_device() {
        let lines = card_args(Path::new("/run/crashmon/vm1.sock"), 2048, None).unwrap();
        let text = shell_lines(&lines);
        assert_eq!(
            text,
            "-m 2048 \\\n\
             -object memory-backend-memfd,id=crashmon-ram,size=2048M,share=on \\\n\
             -machine memory-backend=crashmon-ram \\\n\
             -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/run/crashmon/vm1.sock\",\"type\":\"unix\"}}'"
        );
        assert!(matches!(
            card_args(Path::new("/tmp/a,b"), 1, None),
            Err(VmError::UnsuitablePath { bad: ',', .. })
        ));
        // With the folder, the node that makes QEMU refuse live migration comes first.
        let blocked =
            card_args(Path::new("/s"), 64, Some(Path::new(DEFAULT_NO_MIGRATION_DIR))).unwrap();
        assert_eq!(blocked.len(), lines.len() + 1);
        assert_eq!(blocked[3][0], "-blockdev");
        assert!(blocked[3][1].contains("\"dir\":\"/run/crashmon/no-migration\""));
        assert!(blocked[3][1].contains("crashmon-card-cannot-migrate"));
    }

    #[test]
    fn the_vm_boots_a_kernel_only_when_given_one() {
        let mut config = VmConfig::new("t", Path::new("/r/card.sock"), Path::new("/r"));
        let args = config.args().unwrap();
        assert!(!args.iter().any(|a| a == "-kernel" || a == "-append"));
        for pair in [
            ["-accel", "tcg"],
            ["-machine", "q35"],
            ["-qmp", "unix:/r/qmp.sock,server=on,wait=off"],
        ] {
            assert!(args.windows(2).any(|w| w == pair), "{pair:?} missing from {args:?}");
        }
        config.kernel = Some("/k/bzImage".into());
        config.append = Some("console=ttyS0 panic=-1".into());
        let args = config.args().unwrap();
        assert!(args.windows(2).any(|w| w == ["-kernel", "/k/bzImage"]));
        assert!(args.windows(2).any(|w| w == ["-append", "console=ttyS0 panic=-1"]));
        assert!(!args.iter().any(|a| a == "-initrd"));
        assert!(!args.iter().any(|a| a == "-incoming"));
        config.incoming = Some("defer".into());
        let args = config.args().unwrap();
        assert!(args.windows(2).any(|w| w == ["-incoming", "defer"]));
    }
}
