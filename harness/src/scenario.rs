//! One crash, end to end: the real `crashmon-device` process, a real QEMU with the card, the
//! test guest bug checking, the dump landing on the host, and the checks of [`crate::verify`].
//!
//! The guest halts after its dump (`CRASHMON HALT`); only then is QEMU's own image of guest RAM
//! taken with `pmemsave`, so every page of the dump can be compared with it.

use crate::device::{self, DeviceConfig, DeviceProcess};
use crate::qemu::Qemu;
use crate::qmp::QmpClient;
use crate::serial::{self, Boot};
use crate::verify::{self, Expected, Verified, Workload};
use crate::vm::{Vm, VmConfig};
use anyhow::{bail, ensure, Context, Result};
use crashmon_device_model::capture::{DumpState, Sidecar};
use kdmp_parser::structs::DumpType;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Tag of the crashmon driver's secondary data block, as laid out in memory: the driver's own
/// constant.
pub const DRIVER_GUID: [u8; 16] = crashmon_guest_driver::driver::CRASHMON_SECONDARY_GUID.to_bytes();
/// Tag of the test guest's report of callbacks that broke the rules.
pub const REPORT_GUID: [u8; 16] = crashmon_dump_writer::GUEST_REPORT_GUID;

/// What crashes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `KeBugCheckEx(code, p1..p4)`.
    BugCheck {
        /// The code.
        code: u32,
        /// The parameters.
        parameters: [u64; 4],
    },
    /// The host's QMP `inject-nmi`: bug check 0x80.
    Nmi,
    /// A read of an unmapped address: bug check 0x50.
    PageFault,
    /// A divide by zero: bug check 0x8E.
    Divide,
}

/// One crash scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Names the VM, its files and its output folder.
    pub name: String,
    /// What crashes the guest.
    pub trigger: Trigger,
    /// Full (type 1) or bitmap (type 5).
    pub bitmap: bool,
    /// Explicit offsets, written back to front, instead of Offset -1 in file order.
    pub out_of_order: bool,
    /// Callbacks that break the rules: any of `alloc`, `lock`, `wait`.
    pub misbehave: Vec<String>,
    /// Crash again after this many guest resets (`reboot=`): `1` gives two dumps.
    pub reboots: u32,
    /// Guest RAM in MiB (at most 2048, so that it all sits below the PCI hole).
    pub memory_mb: u32,
    /// How long the dumps may take to be complete on the host once the guest has halted (a
    /// slow disk needs longer).
    pub dump_timeout: Duration,
    /// Whether QEMU refuses live migration, as `crashmon-card.args` makes it (the default).
    pub migration_blocker: bool,
    /// Percent of the workload's pages the guest leaves all zero (its `zero=` option).
    pub zero_percent: u8,
    /// Guest RAM shared with the device model (the default): the driver proves DMA mode and
    /// the card reads the dump from guest memory. Off, the probe fails and the dump goes
    /// through the data window (copy mode).
    pub shared_memory: bool,
    /// The guest's driver may prove DMA mode (the default); off (`dma=off`), it uses copy mode
    /// even with shared guest RAM.
    pub guest_dma: bool,
}

impl Scenario {
    /// A sequential full dump of a `KeBugCheckEx` with a recognisable code.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            trigger: Trigger::BugCheck {
                code: 0xDEAD_0001,
                parameters: [0x1111, 0x2222_0000_0000, 0xFFFF_F800_1234_5678, 4],
            },
            bitmap: false,
            out_of_order: false,
            misbehave: Vec::new(),
            reboots: 0,
            memory_mb: 128,
            dump_timeout: Duration::from_secs(60),
            migration_blocker: true,
            zero_percent: 0,
            shared_memory: true,
            guest_dma: true,
        }
    }

    /// The guest's kernel command line.
    pub fn append(&self) -> String {
        let mut a = match self.trigger {
            Trigger::BugCheck { code, parameters: p } => format!(
                "trigger=bugcheck code={code:#x} p1={:#x} p2={:#x} p3={:#x} p4={:#x}",
                p[0], p[1], p[2], p[3]
            ),
            Trigger::Nmi => "trigger=nmi".into(),
            Trigger::PageFault => "trigger=pagefault".into(),
            Trigger::Divide => "trigger=divide".into(),
        };
        a += if self.bitmap { " dump=bitmap" } else { " dump=full" };
        a += if self.out_of_order { " order=outoforder" } else { " order=sequential" };
        if !self.misbehave.is_empty() {
            a += &format!(" misbehave={}", self.misbehave.join(","));
        }
        if self.reboots > 0 {
            a += &format!(" reboot={}", self.reboots);
        }
        if self.zero_percent > 0 {
            a += &format!(" zero={}", self.zero_percent);
        }
        if !self.guest_dma {
            a += " dma=off";
        }
        a
    }

    /// What crashes the guest, in words.
    pub fn describe_trigger(&self) -> String {
        match self.trigger {
            Trigger::BugCheck { code, parameters: p } => format!(
                "KeBugCheckEx({code:#010x}, {:#x}, {:#x}, {:#x}, {:#x})",
                p[0], p[1], p[2], p[3]
            ),
            Trigger::Nmi => "an NMI from the host (QMP inject-nmi)".into(),
            Trigger::PageFault => "a read of an unmapped kernel address".into(),
            Trigger::Divide => "a divide by zero".into(),
        }
    }

    fn dumps_expected(&self) -> usize {
        self.reboots as usize + 1
    }
}

/// A dump on the host with what was checked.
#[derive(Debug, Clone)]
pub struct CheckedDump {
    /// The dump file.
    pub path: PathBuf,
    /// Its sidecar.
    pub sidecar: Sidecar,
    /// What passed.
    pub verified: Verified,
    /// The bug check the guest raised (from its serial log).
    pub bugcheck: (u32, [u64; 4]),
    /// Rule violations the guest reported.
    pub violations: Vec<String>,
    /// Seconds from the session's start to its completion, from the sidecar.
    pub seconds: f64,
}

/// What a scenario left behind.
#[derive(Debug)]
pub struct Outcome {
    /// The dumps, oldest first.
    pub dumps: Vec<CheckedDump>,
    /// Where the run's files are.
    pub run_dir: PathBuf,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
}

/// The pieces a scenario runs with.
pub struct Rig {
    /// The QEMU to run.
    pub qemu: Qemu,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The device model binary.
    pub device: PathBuf,
}

impl Rig {
    /// One rig for a whole test binary, prepared on first use (with the test logger), so that
    /// each test file does not build the guest again. Panics if it cannot be prepared.
    pub fn shared() -> &'static Rig {
        static RIG: std::sync::OnceLock<Rig> = std::sync::OnceLock::new();
        RIG.get_or_init(|| {
            let _ =
                env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                    .is_test(true)
                    .try_init();
            Rig::prepare().expect("QEMU, the guest and the device model")
        })
    }

    /// Finds or provisions QEMU, builds the guest and finds the device model.
    pub fn prepare() -> Result<Rig> {
        Ok(Rig {
            qemu: Qemu::find_or_provision().context("no QEMU with vfio-user-pci")?,
            kernel: crate::guest::build()?,
            device: device::locate_binary()?,
        })
    }
}

/// A running VM with its card, for scenarios that need to act in the middle of one.
pub struct Running {
    /// The device model.
    pub card: DeviceProcess,
    /// QEMU.
    pub vm: Vm,
    /// QMP to QEMU.
    pub qmp: QmpClient,
    /// The run's folder.
    pub run_dir: PathBuf,
    /// Where the device model writes dumps.
    pub dumps_dir: PathBuf,
    /// What the guest printed on the migration source before it moved here.
    serial_before: Vec<serial::Line>,
    /// The VM's name: the device model's `--vm-name`, in each of its sidecars.
    vm_name: String,
    /// Sessions whose sidecars were in `dumps_dir` before this run: earlier runs' dumps, which
    /// the folder may keep (the demo's does), are not this run's.
    earlier_sessions: HashSet<String>,
    started: Instant,
    /// The NMI of an NMI scenario was already injected (see [`Running::inject_nmi_timed`]).
    nmi_sent: bool,
}

impl Running {
    /// Starts the device model and QEMU for `scenario` in `run_dir` (sockets, logs, the RAM
    /// image), with dumps in `run_dir/dumps`.
    pub fn start(rig: &Rig, scenario: &Scenario, run_dir: &Path) -> Result<Running> {
        Self::start_with_dumps_in(rig, scenario, run_dir, &run_dir.join("dumps"))
    }

    /// [`Running::start`] with dumps in `dumps_dir`.
    pub fn start_with_dumps_in(
        rig: &Rig,
        scenario: &Scenario,
        run_dir: &Path,
        dumps_dir: &Path,
    ) -> Result<Running> {
        Self::launch(rig, scenario, run_dir, dumps_dir, None, |_| {})
    }

    /// [`Running::start_with_dumps_in`], letting `device` change how the device model runs
    /// (its user, extra arguments, environment) before it starts.
    pub fn start_with_device(
        rig: &Rig,
        scenario: &Scenario,
        run_dir: &Path,
        dumps_dir: &Path,
        device: impl FnOnce(&mut DeviceConfig),
    ) -> Result<Running> {
        Self::launch(rig, scenario, run_dir, dumps_dir, None, device)
    }

    /// The destination of a live migration: its own device model (dumps in `dumps_dir`) and a
    /// QEMU started like [`Running::start`]'s but with `-incoming defer`, waiting for
    /// [`migrate`] to bring the guest over.
    pub fn start_incoming(
        rig: &Rig,
        scenario: &Scenario,
        run_dir: &Path,
        dumps_dir: &Path,
    ) -> Result<Running> {
        Self::launch(rig, scenario, run_dir, dumps_dir, Some("defer"), |_| {})
    }

    fn launch(
        rig: &Rig,
        scenario: &Scenario,
        run_dir: &Path,
        dumps_dir: &Path,
        incoming: Option<&str>,
        device: impl FnOnce(&mut DeviceConfig),
    ) -> Result<Running> {
        ensure!(scenario.memory_mb <= 2048, "guest RAM above 2 GiB would straddle the PCI hole");
        std::fs::create_dir_all(run_dir)?;
        let dumps_dir = dumps_dir.to_owned();
        // Before the device model starts: everything there now belongs to earlier runs.
        let earlier_sessions =
            sidecars_in(&dumps_dir).map(|(_, sidecar)| sidecar.session_id.to_string()).collect();
        let mut device_config = DeviceConfig {
            binary: rig.device.clone(),
            socket: run_dir.join("card.sock"),
            output_dir: dumps_dir.clone(),
            vm_name: scenario.name.clone(),
            max_dump_size: None,
            once: true,
            log: run_dir.join("device.log"),
            user: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        device(&mut device_config);
        let card = DeviceProcess::spawn(&device_config, Duration::from_secs(30))?;
        let mut config = VmConfig::new(&scenario.name, card.socket(), run_dir);
        config.memory_mb = scenario.memory_mb;
        config.kernel = Some(rig.kernel.clone());
        config.append = Some(scenario.append());
        config.incoming = incoming.map(str::to_owned);
        config.migration_blocker = scenario.migration_blocker;
        config.shared_memory = scenario.shared_memory;
        let mut vm = Vm::launch(&rig.qemu, &config)?;
        let qmp = vm.connect_qmp(Duration::from_secs(60))?;
        Ok(Running {
            card,
            vm,
            qmp,
            run_dir: run_dir.to_owned(),
            dumps_dir,
            serial_before: Vec::new(),
            vm_name: scenario.name.clone(),
            earlier_sessions,
            started: Instant::now(),
            nmi_sent: false,
        })
    }

    /// Injects the NMI of an NMI scenario once the guest waits for it, and returns how long
    /// the device model took to log its first line about the crash (`bug checked`), polling
    /// its log every half millisecond from just before the QMP command.
    pub fn inject_nmi_timed(&mut self) -> Result<Duration> {
        self.wait_serial("WAITING nmi", 1, CRASH_TIMEOUT)?;
        let log = self.card.log_path().to_owned();
        let seen = |log: &Path| {
            std::fs::read_to_string(log).is_ok_and(|t| t.lines().any(|l| l.contains("bug checked")))
        };
        ensure!(!seen(&log), "the device model logged a crash before the NMI\n{}", self.logs());
        let start = Instant::now();
        self.qmp.inject_nmi().with_context(|| format!("QMP inject-nmi\n{}", self.logs()))?;
        self.nmi_sent = true;
        while !seen(&log) {
            ensure!(
                start.elapsed() < CRASH_TIMEOUT,
                "no crash line after the NMI\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(start.elapsed())
    }

    /// The guest's serial lines so far (after a migration, the source's lines first).
    pub fn serial(&self) -> Vec<serial::Line> {
        let mut lines = self.serial_before.clone();
        lines.extend(serial::read(self.vm.serial_log()));
        lines
    }

    /// Waits until the serial log has `count` lines of `kind`, failing early on a guest error.
    pub fn wait_serial(&mut self, kind: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.serial();
            if lines.iter().filter(|l| l.kind == kind).count() >= count {
                return Ok(());
            }
            if let Some(bad) = lines
                .iter()
                .find(|l| matches!(l.kind.as_str(), "PANIC" | "NESTED" | "DUMP FAILED" | "ERROR"))
            {
                bail!("the guest reported: CRASHMON {}\n{}", bad.text, self.logs());
            }
            if let Some(status) = self.vm.try_wait()? {
                bail!("QEMU exited ({status}) before the guest printed {kind}\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!("the guest did not print {kind} within {timeout:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- serial ({})\n{}\n--- device model\n{}\n--- QEMU\n{}",
            self.vm.serial_log().display(),
            crate::log_tail(self.vm.serial_log(), 40),
            self.card.log_tail(),
            self.vm.log_tail()
        )
    }

    /// This run's dumps with a sidecar in `state`, oldest first: sessions of this VM that
    /// were not in the output folder when the run started.
    pub fn dumps(&self, state: DumpState) -> Vec<(PathBuf, Sidecar)> {
        let mut found: Vec<(PathBuf, Sidecar)> = sidecars_in(&self.dumps_dir)
            .filter(|(_, sidecar)| {
                sidecar.state == state
                    && sidecar.vm_name == self.vm_name
                    && !self.earlier_sessions.contains(&sidecar.session_id.to_string())
            })
            .collect();
        found.sort_by_key(|a| a.1.started_at);
        found
    }

    /// Waits for `count` complete dumps on the host.
    pub fn wait_dumps(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<(PathBuf, Sidecar)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.dumps(DumpState::Complete);
            if done.len() >= count {
                return Ok(done);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {count} complete dumps on the host after {timeout:?}\n{}",
                    done.len(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// QMP `quit`, then both processes must exit cleanly.
    pub fn finish(mut self) -> Result<Duration> {
        if let Err(e) = self.qmp.quit() {
            bail!("QMP quit: {e}\n{}", self.logs());
        }
        let status = self.vm.wait_timeout(Duration::from_secs(30))?;
        ensure!(status.success(), "QEMU exited with {status}\n{}", self.logs());
        let status = self.card.wait_timeout(Duration::from_secs(30))?;
        ensure!(status.success(), "the device model exited with {status}\n{}", self.logs());
        Ok(self.started.elapsed())
    }
}

/// Live-migrates the guest of `source` to `destination` (started with
/// [`Running::start_incoming`]) over a unix socket in the destination's run folder, waits until
/// both sides report the migration completed and the destination runs, and shuts the source down
/// cleanly. Returns the destination, whose serial lines now begin with the source's, and the
/// source's final `query-migrate` (what was transferred, e.g. `vfio.transferred`).
pub fn migrate(
    mut source: Running,
    mut destination: Running,
) -> Result<(Running, crate::qmp::qmp::MigrationInfo)> {
    let socket = destination.run_dir.join("migration.sock");
    let uri = format!("unix:{}", socket.display());
    destination
        .qmp
        .migrate_incoming(&uri)
        .with_context(|| format!("QMP migrate-incoming {uri}\n{}", destination.logs()))?;
    source.qmp.migrate(&uri).with_context(|| format!("QMP migrate {uri}\n{}", source.logs()))?;
    let timeout = Duration::from_secs(120);
    let info = source
        .qmp
        .wait_migration(timeout)
        .with_context(|| format!("migration on the source\n{}", source.logs()))?;
    log::info!("migration completed on the source: {info:?}");
    destination
        .qmp
        .wait_migration(timeout)
        .with_context(|| format!("migration on the destination\n{}", destination.logs()))?;
    let deadline = Instant::now() + timeout;
    while !destination.qmp.query_status()?.running {
        ensure!(
            Instant::now() < deadline,
            "the destination did not resume the guest\n{}",
            destination.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    destination.serial_before = source.serial();
    source.finish().context("shutting down the migration source")?;
    Ok((destination, info))
}

/// The sidecars in `dir` that can be read, each with the path of its dump.
fn sidecars_in(dir: &Path) -> impl Iterator<Item = (PathBuf, Sidecar)> + '_ {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(move |p| {
            let sidecar: Sidecar = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((dir.join(&sidecar.dump_file), sidecar))
        })
}

/// How long one guest may take to boot, crash and dump under TCG.
pub const CRASH_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `scenario` in `run_dir` and checks every dump it produces.
pub fn run(rig: &Rig, scenario: &Scenario, run_dir: &Path) -> Result<Outcome> {
    complete(Running::start(rig, scenario, run_dir)?, scenario)
}

/// Takes a started scenario to its end: the NMI if it needs one, the crash(es), the dumps on
/// the host, QEMU's RAM image, the checks, and a clean shutdown.
pub fn complete(r: Running, scenario: &Scenario) -> Result<Outcome> {
    complete_with(r, scenario, |_| Ok(()))
}

/// [`complete`], running `halted` once the guest has halted and its dumps are on the host, before
/// QEMU's RAM image is taken (benchmarks time QEMU's own dump there).
pub fn complete_with(
    mut r: Running,
    scenario: &Scenario,
    halted: impl FnOnce(&mut Running) -> Result<()>,
) -> Result<Outcome> {
    let run_dir = r.run_dir.clone();
    if scenario.trigger == Trigger::Nmi && !r.nmi_sent {
        r.wait_serial("WAITING nmi", 1, CRASH_TIMEOUT)?;
        r.qmp.inject_nmi().with_context(|| format!("QMP inject-nmi\n{}", r.logs()))?;
    }
    r.wait_serial("HALT", 1, CRASH_TIMEOUT)?;
    let found = r.wait_dumps(scenario.dumps_expected(), scenario.dump_timeout)?;
    ensure!(
        found.len() == scenario.dumps_expected(),
        "{} dumps on the host, expected {}",
        found.len(),
        scenario.dumps_expected()
    );
    halted(&mut r)?;
    let image = run_dir.join("guest-ram.img");
    r.qmp
        .pmemsave(0, u64::from(scenario.memory_mb) << 20, &image)
        .with_context(|| format!("QMP pmemsave\n{}", r.logs()))?;
    let boots = serial::boots(&r.serial());
    let crashed: Vec<&Boot> = boots.iter().filter(|b| b.first("BUGCHECK").is_some()).collect();
    ensure!(
        crashed.len() == found.len(),
        "{} bug checks on serial, {} dumps",
        crashed.len(),
        found.len()
    );

    let mut dumps = Vec::new();
    for (i, ((path, sidecar), boot)) in found.into_iter().zip(crashed).enumerate() {
        let last = i + 1 == scenario.dumps_expected();
        // Only the last crash's memory is still there for pmemsave to see.
        let checked = check(scenario, &path, sidecar, boot, last.then_some(image.as_path()))
            .with_context(|| format!("checking {}\n{}", path.display(), r.logs()))?;
        dumps.push(checked);
    }
    let elapsed = r.finish()?;
    Ok(Outcome { dumps, run_dir, elapsed })
}

/// Checks one dump against what the guest said on serial and, if given, QEMU's RAM image.
pub fn check(
    scenario: &Scenario,
    path: &Path,
    sidecar: Sidecar,
    boot: &Boot,
    ram_image: Option<&Path>,
) -> Result<CheckedDump> {
    let bugcheck = boot.bugcheck().context("no CRASHMON BUGCHECK line")?;
    match scenario.trigger {
        Trigger::BugCheck { code, parameters } => {
            ensure!(
                bugcheck == (code, parameters),
                "guest raised {bugcheck:x?}, triggered {code:#x} {parameters:x?}"
            )
        }
        Trigger::Nmi => ensure!(bugcheck.0 == 0x80, "NMI gave bug check {:#x}", bugcheck.0),
        Trigger::PageFault => {
            ensure!(bugcheck.0 == 0x50, "page fault gave bug check {:#x}", bugcheck.0)
        }
        Trigger::Divide => {
            ensure!(bugcheck.0 == 0x8E && bugcheck.1[0] == 0xC000_0094, "divide gave {bugcheck:x?}")
        }
    }
    let (va, pa, value) = boot.variable().context("no CRASHMON VAR line")?;
    let (start, end, seed) = boot.workload().context("no CRASHMON WORKLOAD line")?;
    let mut secondary = Some((DRIVER_GUID, None));
    let violations = boot.violations();
    if !scenario.misbehave.is_empty() {
        // The report must name each violation the guest caught.
        secondary = Some((REPORT_GUID, None));
    }
    let expected = Expected {
        dump_type: if scenario.bitmap { DumpType::Bmp } else { DumpType::Full },
        bugcheck_code: bugcheck.0,
        bugcheck_parameters: Some(bugcheck.1),
        modified_pfns: boot.modified_pfns(),
        variable: Some((va, value)),
        secondary,
        workload: Some(Workload {
            start,
            end,
            seed,
            var_pfn: pa / 0x1000,
            zero_percent: boot.workload_zero_percent(),
        }),
    };
    let verified = verify::verify(path, ram_image, &expected)?;
    if !scenario.misbehave.is_empty() {
        let bytes = std::fs::read(path)?;
        let report = crashmon_dump_writer::find_secondary_blob(&bytes, &REPORT_GUID)
            .context("no violation report in the dump")?;
        let report = String::from_utf8_lossy(report);
        for what in &scenario.misbehave {
            ensure!(
                violations.iter().any(|v| v.starts_with(what.as_str())),
                "the guest did not catch the {what} violation: {violations:?}"
            );
            ensure!(report.contains(what.as_str()), "the dump's report lacks {what}: {report}");
        }
        crashmon_dump_writer::find_secondary_blob(&bytes, &DRIVER_GUID)
            .context("no driver block in the dump")?;
    }
    // The driver's own view: the card took the whole dump and said COMPLETE, with no refusal.
    let driver = boot.first("DRIVER SESSION").context("no DRIVER SESSION line")?;
    ensure!(
        driver.fields.get("complete").map(String::as_str) == Some("1")
            && driver.fields.get("error").map(String::as_str) == Some("none"),
        "the guest's driver reported: {}",
        driver.text
    );
    ensure!(
        boot.dump_bytes() == Some(verified.dump_bytes),
        "the guest wrote {:?} bytes, the host has {}",
        boot.dump_bytes(),
        verified.dump_bytes
    );
    ensure!(
        sidecar.state == DumpState::Complete && sidecar.rejected_chunks == 0,
        "sidecar: {sidecar:?}"
    );
    ensure!(
        sidecar.size == verified.dump_bytes,
        "sidecar size {} != file {}",
        sidecar.size,
        verified.dump_bytes
    );
    let bc = sidecar.bugcheck.as_ref().context("the sidecar has no bug check")?;
    ensure!(
        bc.code == format!("{:#010x}", bugcheck.0)
            && bc.parameters == bugcheck.1.map(|p| format!("{p:#018x}")),
        "sidecar bug check {bc:?} != {bugcheck:x?}"
    );
    let seconds = sidecar
        .ended_at
        .map_or(f64::NAN, |end| (end - sidecar.started_at).num_milliseconds() as f64 / 1000.0);
    Ok(CheckedDump { path: path.to_owned(), sidecar, verified, bugcheck, violations, seconds })
}

impl CheckedDump {
    /// A short report: file, bug check, bytes, time, throughput, checks passed.
    pub fn report(&self) -> String {
        let mib = self.verified.dump_bytes as f64 / (1 << 20) as f64;
        let mut s = format!(
            "dump      {}\nsidecar   {}\nbug check {:#010x} ({:#x}, {:#x}, {:#x}, {:#x}) [{}]\n\
             size      {} bytes ({:.1} MiB) in {:.2} s: {:.1} MiB/s through the card\n",
            self.path.display(),
            self.path.with_extension("json").display(),
            self.bugcheck.0,
            self.bugcheck.1[0],
            self.bugcheck.1[1],
            self.bugcheck.1[2],
            self.bugcheck.1[3],
            self.sidecar.bugcheck.as_ref().map(|b| format!("{:?}", b.source)).unwrap_or_default(),
            self.verified.dump_bytes,
            mib,
            self.seconds,
            mib / self.seconds,
        );
        if let Some(allocated) = self.sidecar.allocated_bytes {
            s += &format!(
                "on disk   {:.1} MiB ({:.1} MiB of zero pages left as holes)\n",
                allocated as f64 / (1 << 20) as f64,
                self.sidecar.zero_bytes_skipped as f64 / (1 << 20) as f64,
            );
        }
        for v in &self.violations {
            s += &format!("caught    {v}\n");
        }
        for c in &self.verified.checks {
            s += &format!("  ok  {c}\n");
        }
        s
    }
}
