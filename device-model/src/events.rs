//! What happened to a VM's card, as one JSON object per line (`--events PATH` or `-`), and the
//! operator's hooks (`--on-crash`, `--on-dump`).
//!
//! Events are produced where things happen: the card (in the vfio-user message loop) and the
//! session writers. Neither may wait for a slow events file, a full pipe or a hook, so
//! [`Events::emit`] only queues the event on a bounded channel; one thread writes the lines and
//! passes hook requests to the hook runner. When the queue is full the event is dropped and
//! counted, and the next event written says how many were lost (`dropped`), so memory stays
//! bounded whatever a guest does.
//!
//! Hooks run in a separate process, the hook runner (`crashmon-device --hook-runner`, see
//! [`run_hook_runner`]), started before the device model sandboxes itself: the device model
//! never forks or executes anything after it faces the guest. The runner reads one request per
//! line on its standard input and runs each hook with `sh -c`, its environment describing the
//! crash, under a timeout; it logs every hook's exit status.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events queued at most before new ones are dropped (and counted).
const QUEUE_DEPTH: usize = 1024;
/// Hooks running at once in the runner; further requests wait for one to end.
const MAX_RUNNING_HOOKS: usize = 4;

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The guest's driver armed the card: a crash of this VM will be captured.
    Armed,
    /// The guest bug checked: a session opened.
    Bugcheck {
        /// The session (one dump).
        session: String,
        /// Code and parameters, when known (announced, or read from the dump's header).
        #[serde(flatten)]
        bugcheck: Option<BugCheckFields>,
    },
    /// Bytes are arriving.
    Progress {
        /// The session.
        session: String,
        /// Payload bytes written into the file so far.
        bytes_written: u64,
        /// Chunks written so far.
        chunks: u64,
    },
    /// The dump is durable under its final name.
    Complete {
        /// The session.
        session: String,
        /// Details of the dump.
        #[serde(flatten)]
        dump: DumpFields,
    },
    /// The session ended early; every byte received is durable in the file.
    Incomplete {
        /// The session.
        session: String,
        /// Why it ended early.
        reason: String,
        /// Details of the dump.
        #[serde(flatten)]
        dump: DumpFields,
    },
    /// A session ended with no dump byte: no file was kept.
    EmptySession {
        /// The session.
        session: String,
        /// How it ended.
        reason: String,
    },
    /// The card refused a doorbell or command (the first of a session, then a count at its end).
    ChunkRefused {
        /// The error code's name, e.g. `too-large`.
        code: String,
        /// What was refused.
        detail: String,
    },
    /// A limit refused a session or stopped a dump, or removed old dumps.
    Quota {
        /// Which limit.
        limit: String,
        /// What it did.
        detail: String,
    },
}

/// A bug check in an event: hex strings, as in the sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BugCheckFields {
    /// The code, e.g. "0x000000d1".
    pub code: String,
    /// The four parameters.
    pub parameters: [String; 4],
    /// `announced` or `dump-header`.
    pub source: String,
}

/// A finished dump in an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DumpFields {
    /// The dump file.
    pub dump: PathBuf,
    /// Its sidecar.
    pub sidecar: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Its SHA-256.
    pub sha256: Option<String>,
    /// The bug check, when known.
    pub bugcheck: Option<BugCheckFields>,
}

/// An event as written: when, which VM, what, and how many events before it were dropped.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    vm: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    #[serde(skip_serializing_if = "is_zero")]
    dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A hook request for the runner: the command and its environment.
#[derive(Debug, serde::Deserialize, Serialize, PartialEq, Eq)]
pub struct HookRequest {
    /// `--on-crash` or `--on-dump`, for the runner's log.
    pub hook: String,
    /// Run with `sh -c`.
    pub command: String,
    /// Extra environment: `CRASHMON_*` variables.
    pub env: BTreeMap<String, String>,
}

/// Where events go and which hooks they start.
#[derive(Clone, Debug, Default)]
pub struct EventsConfig {
    /// `--events`: a file appended to, or `-` for standard output.
    pub path: Option<PathBuf>,
    /// `--on-crash`: run when a guest bug checks.
    pub on_crash: Option<String>,
    /// `--on-dump`: run when a dump is durable (complete or incomplete).
    pub on_dump: Option<String>,
    /// How long a hook may run before it is killed.
    pub hook_timeout: Duration,
    /// journald's socket, when running under systemd with the journal on standard error
    /// ([`journal_socket`]): each event is also sent there as structured fields.
    pub journal: Option<PathBuf>,
}

/// Where journald listens, when this process's output goes to the journal (systemd sets
/// `JOURNAL_STREAM` then). `CRASHMON_JOURNAL_SOCKET` names another socket, for tests.
pub fn journal_socket() -> Option<PathBuf> {
    std::env::var_os("JOURNAL_STREAM")?;
    Some(
        std::env::var_os("CRASHMON_JOURNAL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/systemd/journal/socket")),
    )
}

/// The handle producers emit through; cheap to clone. A disabled handle drops everything.
#[derive(Clone, Debug, Default)]
pub struct Events {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    vm: String,
    queue: SyncSender<Message>,
    dropped: AtomicU64,
}

#[derive(Debug)]
enum Message {
    Event(Box<Event>),
    /// Answered once every event queued before it is written.
    Flush(SyncSender<()>),
}

impl Events {
    /// A handle that drops every event (no `--events`, no hooks).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the events thread for `vm`: it writes to the configured file or standard output
    /// and hands hook requests to `hooks` (the runner's standard input). Opening the file is
    /// the only disk access here, done once at startup.
    pub fn start(vm: &str, config: &EventsConfig, hooks: Option<ChildStdin>) -> io::Result<Self> {
        let (events, writer) = Self::prepare(vm, config, hooks)?;
        if let Some(writer) = writer {
            writer.spawn()?;
        }
        Ok(events)
    }

    /// [`Events::start`] in two steps, for a process that sandboxes itself in between: the file
    /// is opened and the queue made now (events emitted meanwhile wait in it); the thread starts
    /// when [`EventsThread::spawn`] is called, so that it inherits the sandbox.
    pub fn prepare(
        vm: &str,
        config: &EventsConfig,
        hooks: Option<ChildStdin>,
    ) -> io::Result<(Self, Option<EventsThread>)> {
        if config.path.is_none() && hooks.is_none() && config.journal.is_none() {
            return Ok((Self::disabled(), None));
        }
        // The datagram socket is made now, before the device model sandboxes itself: the events
        // thread then only sends on it.
        let journal = match &config.journal {
            Some(path) => Some((std::os::unix::net::UnixDatagram::unbound()?, path.clone())),
            None => None,
        };
        let out: Option<Box<dyn Write + Send>> = match &config.path {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(io::stdout())),
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = OpenOptions::new().create(true).append(true).mode(0o600).open(p)?;
                Some(Box::new(f))
            }
        };
        let (queue, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let inner = Arc::new(Inner { vm: vm.to_owned(), queue, dropped: AtomicU64::new(0) });
        let writer = Writer {
            inner: inner.clone(),
            out,
            hooks,
            on_crash: config.on_crash.clone(),
            on_dump: config.on_dump.clone(),
            journal,
        };
        Ok((Self { inner: Some(inner) }, Some(EventsThread { writer, queue: rx })))
    }

    /// Queues `event`; never blocks. A full queue drops it (counted in the next line written).
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else { return };
        match inner.queue.try_send(Message::Event(Box::new(event))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Events {
    /// Waits (at most `timeout`) until every event queued so far is written and its hook
    /// handed to the runner. For the exit path only: it may wait.
    pub fn flush(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        let (done, wait) = mpsc::sync_channel(1);
        let deadline = Instant::now() + timeout;
        let mut message = Message::Flush(done);
        loop {
            match inner.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The events thread, ready to start.
pub struct EventsThread {
    writer: Writer,
    queue: Receiver<Message>,
}

impl EventsThread {
    /// Starts it.
    pub fn spawn(self) -> io::Result<()> {
        let Self { writer, queue } = self;
        std::thread::Builder::new().name("events".into()).spawn(move || writer.run(queue))?;
        Ok(())
    }
}

/// The events thread.
struct Writer {
    inner: Arc<Inner>,
    out: Option<Box<dyn Write + Send>>,
    hooks: Option<ChildStdin>,
    on_crash: Option<String>,
    on_dump: Option<String>,
    journal: Option<(std::os::unix::net::UnixDatagram, PathBuf)>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Message>) {
        while let Ok(message) = rx.recv() {
            let event = match message {
                Message::Event(event) => *event,
                Message::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            let dropped = self.inner.dropped.swap(0, Ordering::Relaxed);
            if let Some(out) = &mut self.out {
                let line = Line {
                    time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    vm: &self.inner.vm,
                    event: &event,
                    dropped,
                };
                if let Err(e) = write_json_line(out, &line) {
                    log::error!("writing an event failed: {e}; events are no longer written");
                    self.out = None;
                }
            }
            self.journal(&event);
            self.hook(&event);
        }
    }

    /// Sends `event` to journald as one entry of structured fields (`CRASHMON_EVENT`,
    /// `CRASHMON_VM`, `CRASHMON_CODE`, ...), with a one-line `MESSAGE`.
    fn journal(&mut self, event: &Event) {
        let Some((socket, path)) = &self.journal else { return };
        let entry = journal_entry(&self.inner.vm, event);
        if let Err(e) = socket.send_to(entry.as_bytes(), path) {
            log::error!("sending an event to the journal failed: {e}; no more are sent");
            self.journal = None;
        }
    }

    fn hook(&mut self, event: &Event) {
        let (hook, command) = match event {
            Event::Bugcheck { .. } => ("on-crash", &self.on_crash),
            Event::Complete { .. } | Event::Incomplete { .. } => ("on-dump", &self.on_dump),
            _ => return,
        };
        let (Some(command), Some(stdin)) = (command, &mut self.hooks) else { return };
        let request = HookRequest {
            hook: hook.into(),
            command: command.clone(),
            env: hook_env(&self.inner.vm, event),
        };
        if let Err(e) = write_json_line(stdin, &request) {
            log::error!("the hook runner is gone ({e}); hooks no longer run");
            self.hooks = None;
        }
    }
}

/// Writes `value` as one line of JSON and flushes it.
fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// A one-line account of `event`, for the journal's `MESSAGE`.
pub fn summary(vm: &str, event: &Event) -> String {
    let bugcheck = |b: &Option<BugCheckFields>| match b {
        Some(b) => format!("{} ({})", b.code, b.parameters.join(", ")),
        None => "(code not known)".to_owned(),
    };
    match event {
        Event::Armed => format!("VM {vm}: the guest's driver armed the crash-monitor card"),
        Event::Bugcheck { bugcheck: b, .. } => format!("VM {vm} bug checked: {}", bugcheck(b)),
        Event::Progress { bytes_written, .. } => {
            format!("VM {vm}: {bytes_written} bytes of the dump written")
        }
        Event::Complete { dump, .. } => {
            format!("VM {vm}: dump complete: {} ({} bytes)", dump.dump.display(), dump.size)
        }
        Event::Incomplete { reason, dump, .. } => format!(
            "VM {vm}: dump incomplete ({reason}): {} ({} bytes)",
            dump.dump.display(),
            dump.size
        ),
        Event::EmptySession { reason, .. } => {
            format!("VM {vm}: a session carried no dump bytes ({reason})")
        }
        Event::ChunkRefused { code, detail } => format!("VM {vm}: refused {code}: {detail}"),
        Event::Quota { limit, detail } => format!("VM {vm}: {limit}: {detail}"),
    }
}

/// `event` as a journald entry (its native protocol: `KEY=value` lines), every field of the
/// event's JSON as `CRASHMON_<FIELD>` (nested ones joined with `_`, lists with spaces).
pub fn journal_entry(vm: &str, event: &Event) -> String {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    flatten(&format!("{prefix}_{}", k.to_ascii_uppercase()), v, out);
                }
            }
            Value::Array(items) => {
                let words: Vec<String> = items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .collect();
                out.push((prefix.to_owned(), words.join(" ")));
            }
            Value::Null => {}
            Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let priority = match event {
        Event::Bugcheck { .. } | Event::Incomplete { .. } | Event::Quota { .. } => 4,
        Event::ChunkRefused { .. } => 5,
        _ => 6,
    };
    let mut fields = vec![
        ("MESSAGE".to_owned(), summary(vm, event)),
        ("PRIORITY".to_owned(), priority.to_string()),
        ("SYSLOG_IDENTIFIER".to_owned(), "crashmon-device".to_owned()),
        ("CRASHMON_VM".to_owned(), vm.to_owned()),
    ];
    flatten("CRASHMON", &serde_json::to_value(event).unwrap_or_default(), &mut fields);
    let mut entry = String::new();
    for (key, value) in fields {
        // One line per field: a value never holds a newline (the protocol would need its
        // binary form for that).
        entry.push_str(&key);
        entry.push('=');
        entry.push_str(&value.replace('\n', " "));
        entry.push('\n');
    }
    entry
}

/// The `CRASHMON_*` environment a hook gets for `event`.
pub fn hook_env(vm: &str, event: &Event) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(format!("CRASHMON_{k}"), v);
    };
    set("VM", vm.to_owned());
    let bugcheck = |b: &Option<BugCheckFields>, set: &mut dyn FnMut(&str, String)| {
        if let Some(b) = b {
            set("BUGCHECK_CODE", b.code.clone());
            for (i, p) in b.parameters.iter().enumerate() {
                set(&format!("BUGCHECK_P{}", i + 1), p.clone());
            }
            set("BUGCHECK_SOURCE", b.source.clone());
        }
    };
    match event {
        Event::Bugcheck { session, bugcheck: b } => {
            set("EVENT", "crash".into());
            set("SESSION", session.clone());
            bugcheck(b, &mut set);
        }
        Event::Complete { session, dump } | Event::Incomplete { session, dump, .. } => {
            set("EVENT", "dump".into());
            set("SESSION", session.clone());
            let state =
                if matches!(event, Event::Complete { .. }) { "complete" } else { "incomplete" };
            set("STATE", state.into());
            if let Event::Incomplete { reason, .. } = event {
                set("REASON", reason.clone());
            }
            set("DUMP", dump.dump.display().to_string());
            set("SIDECAR", dump.sidecar.display().to_string());
            set("SIZE", dump.size.to_string());
            set("BYTES_RECEIVED", dump.bytes_received.to_string());
            if let Some(sha) = &dump.sha256 {
                set("SHA256", sha.clone());
            }
            bugcheck(&dump.bugcheck, &mut set);
        }
        _ => {}
    }
    env
}

/// Starts the hook runner: this same executable with `--hook-runner`, its standard input the
/// request pipe. Called before the device model sandboxes itself.
pub fn spawn_hook_runner(timeout: Duration) -> io::Result<(Child, ChildStdin)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--hook-runner")
        .arg(format!("--hook-timeout={}", timeout.as_secs()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stdin = child.stdin.take().ok_or_else(|| io::Error::other("no stdin pipe"))?;
    Ok((child, stdin))
}

/// The hook runner's main loop: one [`HookRequest`] per line of `input`, each run with `sh -c`
/// under `timeout`, at most [`MAX_RUNNING_HOOKS`] at once; returns when `input` ends and every
/// hook has ended.
pub fn run_hook_runner(input: impl BufRead + Send, timeout: Duration) {
    let mut running: Vec<(HookRequest, Child, Instant)> = Vec::new();
    let reap = |running: &mut Vec<(HookRequest, Child, Instant)>, wait_one: bool| loop {
        running.retain_mut(|(req, child, started)| match child.try_wait() {
            Ok(Some(status)) => {
                log::info!("hook {} ({}) exited with {status}", req.hook, req.command);
                false
            }
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                log::warn!("hook {} ({}) killed after {timeout:?}", req.hook, req.command);
                false
            }
            Ok(None) => true,
            Err(e) => {
                log::error!("hook {} ({}): {e}", req.hook, req.command);
                false
            }
        });
        if !wait_one || running.len() < MAX_RUNNING_HOOKS {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (lines_tx, lines_rx) = mpsc::channel::<io::Result<String>>();
    // Reading stdin blocks; hooks are reaped meanwhile, so read on a thread of its own.
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for line in input.lines() {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            match lines_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(line)) => {
                    let Ok(req) = serde_json::from_str::<HookRequest>(&line) else {
                        log::error!("hook runner: unreadable request");
                        continue;
                    };
                    reap(&mut running, true);
                    match Command::new("/bin/sh")
                        .arg("-c")
                        .arg(&req.command)
                        .envs(&req.env)
                        .stdin(Stdio::null())
                        .spawn()
                    {
                        Ok(child) => running.push((req, child, Instant::now())),
                        Err(e) => {
                            log::error!("hook {} ({}): cannot start: {e}", req.hook, req.command)
                        }
                    }
                }
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => reap(&mut running, false),
            }
        }
        while !running.is_empty() {
            reap(&mut running, false);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_vm_time_and_kind() {
        let event = Event::Bugcheck {
            session: "s1".into(),
            bugcheck: Some(BugCheckFields {
                code: "0x000000d1".into(),
                parameters: ["0x1".into(), "0x2".into(), "0x3".into(), "0x4".into()],
                source: "announced".into(),
            }),
        };
        let line = Line { time: "t".into(), vm: "win11", event: &event, dropped: 0 };
        let v: serde_json::Value = serde_json::to_value(&line).unwrap();
        assert_eq!(v["event"], "bugcheck");
        assert_eq!(v["vm"], "win11");
        assert_eq!(v["code"], "0x000000d1");
        assert_eq!(v["parameters"][3], "0x4");
        assert!(v.get("dropped").is_none());
    }

    #[test]
    fn journal_entries_are_structured_fields() {
        let event = Event::Bugcheck {
            session: "s1".into(),
            bugcheck: Some(BugCheckFields {
                code: "0x000000d1".into(),
                parameters: ["0x1".into(), "0x2".into(), "0x3".into(), "0x4".into()],
                source: "announced".into(),
            }),
        };
        let entry = journal_entry("win11", &event);
        let lines: Vec<&str> = entry.lines().collect();
        assert!(lines.contains(&"MESSAGE=VM win11 bug checked: 0x000000d1 (0x1, 0x2, 0x3, 0x4)"));
        assert!(lines.contains(&"PRIORITY=4"));
        assert!(lines.contains(&"CRASHMON_EVENT=bugcheck"));
        assert!(lines.contains(&"CRASHMON_VM=win11"));
        assert!(lines.contains(&"CRASHMON_SESSION=s1"));
        assert!(lines.contains(&"CRASHMON_CODE=0x000000d1"));
        assert!(lines.contains(&"CRASHMON_PARAMETERS=0x1 0x2 0x3 0x4"));
        let quota =
            journal_entry("v", &Event::Quota { limit: "keep".into(), detail: "a\nb".into() });
        assert!(quota.lines().any(|l| l == "CRASHMON_DETAIL=a b"), "{quota}");
    }

    #[test]
    fn hook_environment_describes_the_dump() {
        let event = Event::Incomplete {
            session: "s2".into(),
            reason: "VM reset".into(),
            dump: DumpFields {
                dump: "/d/x.incomplete.dmp".into(),
                sidecar: "/d/x.json".into(),
                size: 10,
                bytes_received: 8,
                sha256: Some("ab".into()),
                bugcheck: None,
            },
        };
        let env = hook_env("vm1", &event);
        assert_eq!(env["CRASHMON_EVENT"], "dump");
        assert_eq!(env["CRASHMON_STATE"], "incomplete");
        assert_eq!(env["CRASHMON_REASON"], "VM reset");
        assert_eq!(env["CRASHMON_DUMP"], "/d/x.incomplete.dmp");
        assert_eq!(env["CRASHMON_SIZE"], "10");
        assert!(!env.contains_key("CRASHMON_BUGCHECK_CODE"));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (queue, rx) = mpsc::sync_channel(1);
        let events = Events {
            inner: Some(Arc::new(Inner { vm: "v".into(), queue, dropped: AtomicU64::new(0) })),
        };
        for _ in 0..5 {
            events.emit(Event::Armed);
        }
        assert_eq!(events.inner.as_ref().unwrap().dropped.load(Ordering::Relaxed), 4);
        drop(rx);
    }

    #[test]
    fn the_runner_runs_hooks_with_their_environment_and_kills_slow_ones() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut env = BTreeMap::new();
        env.insert("CRASHMON_VM".to_owned(), "vm9".to_owned());
        let ok = HookRequest {
            hook: "on-dump".into(),
            command: format!("echo \"$CRASHMON_VM\" > {}", out.display()),
            env,
        };
        let slow = HookRequest {
            hook: "on-crash".into(),
            command: format!("sleep 30; echo late > {}.late", out.display()),
            env: BTreeMap::new(),
        };
        let input = format!(
            "{}\nnot json\n{}\n",
            serde_json::to_string(&ok).unwrap(),
            serde_json::to_string(&slow).unwrap()
        );
        run_hook_runner(io::Cursor::new(input), Duration::from_secs(1));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "vm9\n");
        assert!(!dir.path().join("out.late").exists());
    }
}
