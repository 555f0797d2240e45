//! The JSON sidecar written beside every dump: what the host knows about one crash.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Value of [`Sidecar::format`].
pub const SIDECAR_FORMAT: &str = "crashmon-sidecar/1";

/// Where a dump stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DumpState {
    /// Bytes are still arriving (or the device model died while they were).
    Streaming,
    /// `KbDumpIoComplete` arrived; the file was fsync'd and renamed to its final name.
    Complete,
    /// The session ended early; every byte received is in the file.
    Incomplete,
}

/// How the guest placed its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteOrder {
    /// No chunk yet.
    None,
    /// Every chunk had Offset -1.
    Sequential,
    /// Every chunk had an explicit offset.
    Explicit,
    /// Both kinds.
    Mixed,
}

/// Where the bug-check code and parameters came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BugCheckSource {
    /// The driver wrote them to the card (`CONTROL.ANNOUNCE`).
    Announced,
    /// Read from the dump's own `DUMP_HEADER64`.
    DumpHeader,
}

/// How [`Sidecar::sha256`] was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashSource {
    /// As the bytes arrived: every chunk appended at the end of the file, none read back.
    Streamed,
    /// Read back from the file once it was durable (chunks came out of order, or the file was
    /// recovered after a device model died).
    ReadBack,
}

/// A bug check, with hex strings so that 64-bit pointers survive any JSON reader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BugCheckInfo {
    /// The code, e.g. "0x000000d1".
    pub code: String,
    /// The four parameters, e.g. "0xfffff80312345678".
    pub parameters: [String; 4],
    /// Where they came from.
    pub source: BugCheckSource,
}

impl BugCheckInfo {
    /// The same, for an event.
    pub fn fields(&self) -> crate::events::BugCheckFields {
        crate::events::BugCheckFields {
            code: self.code.clone(),
            parameters: self.parameters.clone(),
            source: match self.source {
                BugCheckSource::Announced => "announced",
                BugCheckSource::DumpHeader => "dump-header",
            }
            .to_owned(),
        }
    }

    /// Formats a code and parameters.
    pub fn new(code: u32, parameters: [u64; 4], source: BugCheckSource) -> Self {
        Self {
            code: format!("{code:#010x}"),
            parameters: parameters.map(|p| format!("{p:#018x}")),
            source,
        }
    }
}

/// Payload bytes accepted per `KBUGCHECK_DUMP_IO_TYPE`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesByType {
    /// `KbDumpIoHeader`.
    pub header: u64,
    /// `KbDumpIoBody`.
    pub body: u64,
    /// `KbDumpIoSecondaryData`.
    pub secondary_data: u64,
}

/// The sidecar document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    /// [`SIDECAR_FORMAT`].
    pub format: String,
    /// Unique per crash session.
    pub session_id: Uuid,
    /// The VM's name as given to the device model.
    pub vm_name: String,
    /// The dump's file name, in the same folder as the sidecar.
    pub dump_file: String,
    /// Where the dump stands.
    pub state: DumpState,
    /// Why an incomplete dump ended early.
    pub incomplete_reason: Option<String>,
    /// The bug check, when announced or read from the header.
    pub bugcheck: Option<BugCheckInfo>,
    /// When the session opened (RFC 3339, UTC, milliseconds: see [`time`]).
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    /// When it closed.
    #[serde(with = "time::optional")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The file's size: the end of the furthest chunk.
    pub size: u64,
    /// Payload bytes accepted (overlapping chunks count each time).
    pub bytes_received: u64,
    /// [`Sidecar::bytes_received`] per chunk type.
    pub bytes_by_type: BytesByType,
    /// Chunks accepted.
    pub chunks: u64,
    /// How chunks were placed.
    pub write_order: WriteOrder,
    /// Bytes of `[0, size)` that no chunk wrote; `None` when the guest scattered too many ranges
    /// to track.
    pub missing_bytes: Option<u64>,
    /// The first holes, `[start, end)`.
    pub missing_ranges: Vec<[u64; 2]>,
    /// Doorbells the card refused during the session.
    pub rejected_chunks: u64,
    /// The first refusal, e.g. "too-large: chunk ends at 0x... past the maximum 0x...".
    pub first_error: Option<String>,
    /// SHA-256 of the file as closed, lowercase hex; `None` while streaming.
    pub sha256: Option<String>,
    /// How `sha256` was computed.
    #[serde(default)]
    pub sha256_source: Option<HashSource>,
    /// Chunks the host accepted but could not write (for example, its disk was full).
    #[serde(default)]
    pub write_errors: u64,
    /// The first of them.
    #[serde(default)]
    pub first_write_error: Option<String>,
    /// The longest time, in microseconds, the device model took to answer one vfio-user
    /// message from the session's start until its file was durable.
    #[serde(default)]
    pub longest_answer_us: Option<u64>,
    /// Bytes of all-zero pages that were not written: the file has holes there, which read as
    /// zeros ([`Sidecar::size`] and `sha256` are those of every byte).
    #[serde(default)]
    pub zero_bytes_skipped: u64,
    /// Disk space the dump file takes once closed (its allocated blocks), beside its logical
    /// [`Sidecar::size`].
    #[serde(default)]
    pub allocated_bytes: Option<u64>,
    /// Chunks the card read from guest memory itself (DMA mode) rather than from the data
    /// window; they are counted in [`Sidecar::chunks`] too.
    #[serde(default)]
    pub dma_chunks: u64,
}

/// Sidecar times: written as RFC 3339 in UTC with milliseconds (`2026-11-23T10:12:13.456Z`), the
/// form sidecars have always had; read back from any RFC 3339 time. A time kept in a sidecar is
/// cut to milliseconds first ([`time::at_millis`]), so that a sidecar read back from disk equals
/// the one in memory.
pub mod time {
    use super::*;
    use serde::{de::Error as _, Deserializer, Serializer};

    /// `t` cut to whole milliseconds, as a sidecar stores it.
    pub fn at_millis(t: DateTime<Utc>) -> DateTime<Utc> {
        t.trunc_subsecs(3)
    }

    /// Now, cut to whole milliseconds.
    pub fn now() -> DateTime<Utc> {
        at_millis(Utc::now())
    }

    /// `t` as a sidecar writes it.
    pub fn text(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Serde: a time as [`text`].
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(t))
    }

    /// Serde: any RFC 3339 time, in UTC.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s).map(|t| t.to_utc()).map_err(D::Error::custom)
    }

    /// The same for an optional time (`null` when absent).
    pub mod optional {
        use super::*;

        /// Serde: `null` or [`text`].
        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        /// Serde: `null` or any RFC 3339 time.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| DateTime::parse_from_rfc3339(&s).map(|t| t.to_utc()))
                .transpose()
                .map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::time;
    use chrono::{DateTime, TimeZone, Utc};

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Times {
        #[serde(with = "time")]
        at: DateTime<Utc>,
        #[serde(with = "time::optional")]
        until: Option<DateTime<Utc>>,
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds_and_read_back_equal() {
        let at = time::at_millis(Utc.timestamp_nanos(1_795_000_000_123_456_789));
        let t = Times { at, until: None };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"at":"2026-11-18T11:06:40.123Z","until":null}"#);
        assert_eq!(serde_json::from_str::<Times>(&json).unwrap(), t);
        // Any RFC 3339 time is read, in UTC; anything else is refused.
        let other: Times = serde_json::from_str(
            r#"{"at":"2026-11-18T10:46:40.5+01:00","until":"2026-11-18T09:46:41Z"}"#,
        )
        .unwrap();
        assert_eq!(time::text(&other.at), "2026-11-18T09:46:40.500Z");
        assert_eq!(
            other.until.map(|u| time::text(&u)).as_deref(),
            Some("2026-11-18T09:46:41.000Z")
        );
        assert!(serde_json::from_str::<Times>(r#"{"at":"yesterday","until":null}"#).is_err());
    }
}
