//! A QMP client over a unix socket: drives and inspects a running QEMU.
//!
//! Commands, their results and errors are the `qapi` crate's types, generated from QEMU's own
//! schema. The client reads the JSON lines itself rather than through `qapi::Qmp`, so that an
//! event the crate's schema does not know (QEMU is newer than it) is queued as a raw [`Event`]
//! instead of failing the command that happened to be waiting for its answer.

use serde_json::Value;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

pub use qapi::qmp;

/// How long a command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to QEMU.
#[derive(Debug, Error)]
pub enum QmpError {
    /// QEMU did not accept a connection in time.
    #[error("cannot connect to the QMP socket {path} within {timeout:?}")]
    Connect { path: PathBuf, timeout: Duration, source: io::Error },
    /// Reading or writing the socket failed.
    #[error("QMP connection failed")]
    Io(#[from] io::Error),
    /// QEMU closed the connection (it exited).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// QEMU sent something that is not QMP, or a result of an unexpected shape.
    #[error("unexpected QMP message ({reason}): {message}")]
    Protocol { reason: String, message: String },
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {error}")]
    Command { command: &'static str, error: qapi::Error },
}

/// An asynchronous event from QEMU, such as `SHUTDOWN` or `RESET`.
#[derive(Clone, Debug)]
pub struct Event {
    /// The event's name, e.g. `"SHUTDOWN"`.
    pub name: String,
    /// Its `data` member (`null` if there is none).
    pub data: Value,
    /// When QEMU emitted it, since the Unix epoch.
    pub timestamp: Duration,
    raw: Value,
}

impl Event {
    /// The event as the `qapi` crate's typed enum, if the crate's schema knows it.
    pub fn typed(&self) -> Option<qmp::Event> {
        serde_json::from_value(self.raw.clone()).ok()
    }
}

/// A connected, negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not yet complete when a read timed out.
    partial: Vec<u8>,
    events: VecDeque<Event>,
    greeting: Value,
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, retrying until QEMU listens on it or `timeout`
    /// passes, then leaves capabilities negotiation mode (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline && is_not_listening_yet(&e) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(source) => {
                    return Err(QmpError::Connect { path: path.to_owned(), timeout, source })
                }
            }
        };
        let writer = stream.try_clone()?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        let greeting_deadline = deadline.max(Instant::now() + Duration::from_secs(5));
        let greeting = client.read_message(greeting_deadline, "the QMP greeting")?;
        client.greeting = match greeting {
            Incoming::Greeting(value) => value,
            other => return Err(protocol_error("expected the QMP greeting", &other)),
        };
        client.execute(&qmp::qmp_capabilities { enable: None })?;
        Ok(client)
    }

    /// QEMU's version as announced in its greeting, e.g. "11.1.3".
    pub fn qemu_version(&self) -> String {
        let v = &self.greeting["version"]["qemu"];
        format!("{}.{}.{}", v["major"], v["minor"], v["micro"])
    }

    /// Runs one command and returns its result; events that arrive meanwhile are queued.
    pub fn execute<C: qapi::Command>(&mut self, command: &C) -> Result<C::Ok, QmpError> {
        let mut line = serde_json::to_vec(&qapi::Execute::<&C>::new(command, None))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        log::debug!("qmp -> {}", String::from_utf8_lossy(&line));
        // One write: QEMU acts on a complete JSON object without waiting for the newline, so
        // after `quit` a separate newline write could meet a closed socket.
        line.push(b'\n');
        self.writer.write_all(&line)?;
        self.writer.flush()?;

        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let what = format!("the answer to {} ({COMMAND_TIMEOUT:?})", C::NAME);
        loop {
            match self.read_message(deadline, &what)? {
                Incoming::Event(event) => self.events.push_back(event),
                Incoming::Return(value) => {
                    return serde_json::from_value(value.clone()).map_err(|e| QmpError::Protocol {
                        reason: format!("result of {} does not match the schema: {e}", C::NAME),
                        message: value.to_string(),
                    });
                }
                Incoming::Error(error) => {
                    return Err(QmpError::Command { command: C::NAME, error })
                }
                other @ Incoming::Greeting(_) => {
                    return Err(protocol_error("expected a response", &other))
                }
            }
        }
    }

    /// `query-pci`: every PCI bus and the devices on it.
    pub fn query_pci(&mut self) -> Result<Vec<qmp::PciInfo>, QmpError> {
        self.execute(&qmp::query_pci {})
    }

    /// `query-status`: whether the VM runs, and its run state.
    pub fn query_status(&mut self) -> Result<qmp::StatusInfo, QmpError> {
        self.execute(&qmp::query_status {})
    }

    /// `stop`: pauses every vCPU (the guest runs no further until `cont`).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::stop {}).map(drop)
    }

    /// `system_reset`: resets the VM as the reset button would.
    pub fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::system_reset {}).map(drop)
    }

    /// `inject-nmi`: sends an NMI to the guest (Windows can be set to bug check on one).
    pub fn inject_nmi(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::inject_nmi {}).map(drop)
    }

    /// `pmemsave`: writes `size` bytes of guest physical memory from `address` to `file`
    /// (a path as QEMU sees it).
    pub fn pmemsave(&mut self, address: u64, size: u64, file: &Path) -> Result<(), QmpError> {
        let filename = file.to_string_lossy().into_owned();
        self.execute(&qmp::pmemsave { val: address, size, filename }).map(drop)
    }

    /// `migrate`: starts migrating the VM to `uri` (e.g. `unix:/run/mig.sock`), where a QEMU
    /// started with `-incoming` listens. Returns once migration has started; follow it with
    /// [`QmpClient::query_migrate`] or [`QmpClient::wait_migration`]. QEMU refuses at once (an
    /// error here) when a migration blocker is in place.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        let command =
            qmp::migrate { uri: Some(uri.to_owned()), channels: None, detach: None, resume: None };
        self.execute(&command).map(drop)
    }

    /// `migrate-incoming`: makes a QEMU started with `-incoming defer` listen on `uri` for the
    /// migration stream.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        let command = qmp::migrate_incoming {
            uri: Some(uri.to_owned()),
            channels: None,
            exit_on_error: None,
        };
        self.execute(&command).map(drop)
    }

    /// `query-migrate`: the state of the current (or last) migration, on either side.
    pub fn query_migrate(&mut self) -> Result<qmp::MigrationInfo, QmpError> {
        self.execute(&qmp::query_migrate {})
    }

    /// Polls `query-migrate` until the migration is `completed` (returning its info) or
    /// `failed`/`cancelled` (an error with QEMU's reason), for up to `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<qmp::MigrationInfo, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => return Ok(info),
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    return Err(QmpError::Protocol {
                        reason: "the migration did not complete".into(),
                        message: format!("{:?}: {:?}", info.status, info.error_desc),
                    })
                }
                _ if Instant::now() >= deadline => {
                    return Err(QmpError::Timeout(format!(
                        "migration to complete ({timeout:?}); last status {:?}",
                        info.status
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `human-monitor-command`: runs an HMP command and returns its text output.
    pub fn human_monitor_command(&mut self, command_line: &str) -> Result<String, QmpError> {
        self.execute(&qmp::human_monitor_command {
            command_line: command_line.to_owned(),
            cpu_index: None,
        })
    }

    /// `quit`: QEMU exits at once. The connection closes after the answer, and may close
    /// before it arrives: that is QEMU quitting too, not a failure.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute(&qmp::quit {}) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::UnexpectedEof
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes every event received so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The next event, waiting up to `timeout` for one.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, &format!("an event ({timeout:?})"))? {
                Incoming::Event(event) => return Ok(event),
                other => log::warn!("ignoring an unsolicited QMP message: {other:?}"),
            }
        }
    }

    /// Waits up to `timeout` for the event called `name`, dropping the events before it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Ok(event) if event.name == name => return Ok(event),
                Ok(event) => log::debug!("skipping event {} while waiting for {name}", event.name),
                Err(QmpError::Timeout(_)) => {
                    return Err(QmpError::Timeout(format!("event {name} ({timeout:?})")))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one message, waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Incoming, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(what.to_owned()));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    log::debug!("qmp <- {}", String::from_utf8_lossy(&line).trim_end());
                    return Incoming::parse(&line);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    return Err(QmpError::Timeout(what.to_owned()))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether a connect error means "QEMU has not created or opened the socket yet".
fn is_not_listening_yet(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
}

/// One line from QEMU, sorted by kind.
#[derive(Debug)]
enum Incoming {
    Greeting(Value),
    Return(Value),
    Error(qapi::Error),
    Event(Event),
}

impl Incoming {
    fn parse(line: &[u8]) -> Result<Self, QmpError> {
        let message = || String::from_utf8_lossy(line).trim_end().to_owned();
        let mut value: Value = serde_json::from_slice(line)
            .map_err(|e| QmpError::Protocol { reason: e.to_string(), message: message() })?;
        if let Some(greeting) = value.get_mut("QMP") {
            return Ok(Incoming::Greeting(greeting.take()));
        }
        if let Some(result) = value.get_mut("return") {
            return Ok(Incoming::Return(result.take()));
        }
        if value.get("error").is_some() {
            return serde_json::from_value(value)
                .map(Incoming::Error)
                .map_err(|e| QmpError::Protocol { reason: e.to_string(), message: message() });
        }
        if let Some(name) = value.get("event").and_then(Value::as_str) {
            let stamp = &value["timestamp"];
            let timestamp = Duration::from_secs(stamp["seconds"].as_u64().unwrap_or(0))
                + Duration::from_micros(stamp["microseconds"].as_u64().unwrap_or(0));
            let event = Event {
                name: name.to_owned(),
                data: value["data"].clone(),
                timestamp,
                raw: value.clone(),
            };
            return Ok(Incoming::Event(event));
        }
        Err(QmpError::Protocol {
            reason: "neither a response nor an event".into(),
            message: message(),
        })
    }
}

fn protocol_error(reason: &str, got: &Incoming) -> QmpError {
    QmpError::Protocol { reason: reason.to_owned(), message: format!("{got:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, then answers each line from `script` after reading one command.
    fn fake_qemu(
        dir: &Path,
        script: Vec<&'static str>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writeln!(writer, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 3, "minor": 1, "major": 11}}, "package": ""}}, "capabilities": ["oob"]}}}}"#).unwrap();
            let mut received = Vec::new();
            for answer in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                received.push(line.trim_end().to_owned());
                writer.write_all(answer.as_bytes()).unwrap();
            }
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            received
        });
        (path, handle)
    }

    #[test]
    fn negotiates_runs_commands_and_queues_unknown_events() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = fake_qemu(
            dir.path(),
            vec![
                "{\"return\": {}}\n",
                concat!(
                    "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 5}, \"event\": \"FROM_THE_FUTURE\", \"data\": {\"x\": 1}}\n",
                    "{\"return\": {\"running\": true, \"singlestep\": false, \"status\": \"running\"}}\n",
                ),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
            ],
        );
        let mut qmp = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.qemu_version(), "11.1.3");
        let status = qmp.query_status().unwrap();
        assert!(status.running);
        match qmp.inject_nmi() {
            Err(QmpError::Command { command: "inject-nmi", error }) => assert_eq!(error.desc, "no"),
            other => panic!("{other:?}"),
        }
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "FROM_THE_FUTURE");
        assert_eq!(events[0].data["x"], 1);
        assert_eq!(events[0].timestamp, Duration::new(1, 5000));
        assert!(events[0].typed().is_none());
        drop(qmp);
        let received = server.join().unwrap();
        assert_eq!(
            received,
            [
                r#"{"execute":"qmp_capabilities","arguments":{}}"#,
                r#"{"execute":"query-status","arguments":{}}"#,
                r#"{"execute":"inject-nmi","arguments":{}}"#,
            ]
        );
    }

    #[test]
    fn waits_for_a_socket_that_appears_late_and_times_out_on_none() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("never");
        let start = Instant::now();
        assert!(matches!(
            QmpClient::connect(&missing, Duration::from_millis(300)),
            Err(QmpError::Connect { .. })
        ));
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
