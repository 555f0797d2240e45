//! `list`: the dumps of a folder, found through their sidecars.

use crate::dump::{self, is_dump_name};
use crate::{bugcheck, ToolError};
use chrono::{DateTime, Utc};
use crashmon_device_model::capture::{sidecar_time, DumpState, SIDECAR_SUFFIX};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

/// One dump, as `list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// The VM's name.
    pub vm: String,
    /// When the session started, RFC 3339 UTC as the sidecar records it.
    pub time: String,
    /// The bug-check code (`0x000000D1`), when known.
    pub bugcheck: Option<String>,
    /// Its well-known name.
    pub bugcheck_name: Option<String>,
    /// The dump's size in bytes: the file's when it is there, else the sidecar's.
    pub size: u64,
    /// Where the dump stands.
    pub state: DumpState,
    /// The dump's file name.
    pub file: String,
    /// The sidecar's file name.
    pub sidecar: String,
    /// The crash session's id.
    pub session_id: String,
    /// Whether the dump file is there.
    pub present: bool,
    #[serde(skip)]
    sort_time: Option<DateTime<Utc>>,
}

impl Entry {
    /// One line of text, without padding: VM, time, bug check, size, state, file.
    pub fn columns(&self) -> [String; 6] {
        let time = self
            .sort_time
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_else(|| self.time.clone());
        let bugcheck = match (&self.bugcheck, &self.bugcheck_name) {
            (Some(c), Some(n)) => format!("{c} {n}"),
            (Some(c), None) => format!("{c} (unknown bug check)"),
            _ => "(bug check unknown)".to_owned(),
        };
        let file =
            if self.present { self.file.clone() } else { format!("{} (missing)", self.file) };
        let state = format!("{:?}", self.state).to_lowercase();
        [self.vm.clone(), time, bugcheck, human_size(self.size), state, file]
    }
}

/// A size in binary units: `64.0 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The dumps in `dir` (through their sidecars), oldest first, and a note for every file that is
/// neither a readable sidecar nor the dump of one.
pub fn scan(dir: &Path) -> Result<(Vec<Entry>, Vec<String>), ToolError> {
    let mut names: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ToolError::io(dir, e))? {
        match entry {
            Ok(e) => match e.file_name().into_string() {
                Ok(n) => names.push(n),
                Err(n) => notes.push(format!("skipping {n:?}: not a UTF-8 file name")),
            },
            Err(e) => notes.push(format!("skipping an entry of {}: {e}", dir.display())),
        }
    }
    names.sort();
    let mut entries = Vec::new();
    let mut claimed = BTreeSet::new();
    for name in names.iter().filter(|n| n.ends_with(SIDECAR_SUFFIX)) {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let sc = match dump::read_sidecar(&path) {
            Ok(sc) => sc,
            Err(e) => {
                let why = match e {
                    ToolError::BadSidecar { message, .. } => {
                        format!("not a crashmon sidecar ({message})")
                    }
                    other => other.to_string(),
                };
                notes.push(format!("skipping {name}: {why}"));
                claimed.insert(name.clone());
                continue;
            }
        };
        claimed.insert(name.clone());
        let dump_path = dir.join(&sc.dump_file);
        let size = std::fs::metadata(&dump_path).ok().filter(|m| m.is_file()).map(|m| m.len());
        if size.is_none() {
            notes.push(format!("{name}: its dump {} is missing", sc.dump_file));
        }
        claimed.insert(sc.dump_file.clone());
        let code = sc.bugcheck.as_ref().and_then(|b| bugcheck::parse_code(&b.code));
        entries.push(Entry {
            vm: sc.vm_name.clone(),
            time: sidecar_time::text(&sc.started_at),
            bugcheck: code.map(bugcheck::code_text),
            bugcheck_name: code.and_then(bugcheck::name).map(str::to_owned),
            size: size.unwrap_or(sc.size),
            state: sc.state,
            file: sc.dump_file.clone(),
            sidecar: name.clone(),
            session_id: sc.session_id.to_string(),
            present: size.is_some(),
            sort_time: Some(sc.started_at),
        });
    }
    for name in names.iter().filter(|n| !claimed.contains(*n)) {
        if name.ends_with(".json.tmp") {
            continue; // a sidecar being replaced right now
        }
        if is_dump_name(name) {
            notes.push(format!("skipping {name}: no sidecar"));
        } else {
            notes.push(format!("skipping {name}: not a crashmon dump or sidecar"));
        }
    }
    entries.sort_by(|a, b| (a.sort_time, &a.time, &a.file).cmp(&(b.sort_time, &b.time, &b.file)));
    Ok((entries, notes))
}

/// The entries as aligned text lines.
pub fn render(entries: &[Entry]) -> Vec<String> {
    let rows: Vec<[String; 6]> = entries.iter().map(Entry::columns).collect();
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(widths).enumerate() {
                if i + 1 == r.len() {
                    line += c;
                } else if i == 3 {
                    line += &format!("{c:>w$}  ");
                } else {
                    line += &format!("{c:<w$}  ");
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
