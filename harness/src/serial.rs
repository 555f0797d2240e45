//! Reading the test guest's serial log: its `CRASHMON ...` lines (protocol in
//! `harness/guest/README.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One `CRASHMON WORD key=value ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The word after `CRASHMON` (e.g. `BUGCHECK`), plus a second word when the line has one
    /// that is not `key=value` (`DUMP DONE`, `WAITING nmi`).
    pub kind: String,
    /// The `key=value` pairs.
    pub fields: BTreeMap<String, String>,
    /// The whole text after `CRASHMON `.
    pub text: String,
}

impl Line {
    /// A field parsed as a number (decimal or `0x` hex).
    pub fn number(&self, key: &str) -> Option<u64> {
        parse_number(self.fields.get(key)?)
    }
}

/// Parses `123` or `0x7b`.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Every `CRASHMON` line of a log, in order. The firmware's text can share a line with the
/// first one, so the marker is matched anywhere in a line.
pub fn parse(log: &str) -> Vec<Line> {
    log.lines()
        .filter_map(|l| l.find("CRASHMON ").map(|at| &l[at + "CRASHMON ".len()..]))
        .map(|text| {
            let mut words = text.split_whitespace();
            let mut kind = words.next().unwrap_or_default().to_owned();
            let mut fields = BTreeMap::new();
            for (i, w) in words.enumerate() {
                match w.split_once('=') {
                    Some((k, v)) => {
                        fields.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                    None if i == 0 => kind = format!("{kind} {w}"),
                    None => {}
                }
            }
            Line { kind, fields, text: text.trim_end().to_owned() }
        })
        .collect()
}

/// Reads and parses a serial log file (empty if it does not exist yet).
pub fn read(path: &Path) -> Vec<Line> {
    parse(&std::fs::read_to_string(path).unwrap_or_default())
}

/// What one boot of the guest said, from its `BOOT` line to the next.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// The lines of this boot.
    pub lines: Vec<Line>,
}

impl Boot {
    /// The first line of `kind`.
    pub fn first(&self, kind: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.kind == kind)
    }

    /// Every line of `kind`.
    pub fn all<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines.iter().filter(move |l| l.kind == kind)
    }

    /// The bug check the guest raised: code and parameters.
    pub fn bugcheck(&self) -> Option<(u32, [u64; 4])> {
        let l = self.first("BUGCHECK")?;
        let p = |k| l.number(k);
        Some((u32::try_from(p("code")?).ok()?, [p("p1")?, p("p2")?, p("p3")?, p("p4")?]))
    }

    /// Pages the guest declared it may change after the dump captured them.
    pub fn modified_pfns(&self) -> BTreeSet<u64> {
        self.all("MODIFIED").filter_map(|l| l.number("pfn")).collect()
    }

    /// The known variable: virtual address, physical address, value.
    pub fn variable(&self) -> Option<(u64, u64, u64)> {
        let l = self.first("VAR")?;
        Some((l.number("va")?, l.number("pa")?, l.number("value")?))
    }

    /// The workload's physical range and seed.
    pub fn workload(&self) -> Option<(u64, u64, u64)> {
        let l = self.first("WORKLOAD")?;
        Some((l.number("start")?, l.number("end")?, l.number("seed")?))
    }

    /// The percent of workload pages left zero (`zero=` on the WORKLOAD line; 0 if absent).
    pub fn workload_zero_percent(&self) -> u64 {
        self.first("WORKLOAD").and_then(|l| l.number("zero")).unwrap_or(0)
    }

    /// `DUMP DONE bytes=N`.
    pub fn dump_bytes(&self) -> Option<u64> {
        self.first("DUMP DONE")?.number("bytes")
    }

    /// Violations the guest caught: `alloc in component/callback`.
    pub fn violations(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.text.strip_prefix("VIOLATION "))
            .map(str::to_owned)
            .collect()
    }
}

/// Splits a log's lines into boots.
pub fn boots(lines: &[Line]) -> Vec<Boot> {
    let mut boots: Vec<Boot> = Vec::new();
    for l in lines {
        if l.kind == "BOOT" || boots.is_empty() {
            boots.push(Boot::default());
        }
        if let Some(b) = boots.last_mut() {
            b.lines.push(l.clone());
        }
    }
    boots
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "SeaBIOS (version 1.16)\nBooting from ROM..CRASHMON BOOT index=0 cmdline=\"trigger=nmi\"\n\
CRASHMON WORKLOAD start=0x200000 end=0x7fe0000 seed=0xc4a5 pages=100 free=pfn%4==3\n\
CRASHMON VAR va=0xfffff78000000100 pa=0x5000100 value=0x1234\n\
CRASHMON WAITING nmi\n\
CRASHMON BUGCHECK code=0x80 p1=0x4f4454 p2=0x0 p3=0x0 p4=0x0\n\
CRASHMON MODIFIED pfn=0x10\nCRASHMON MODIFIED pfn=0x11\n\
CRASHMON VIOLATION alloc in crashmon-misbehave/SecondaryDumpData\n\
CRASHMON DUMP DONE bytes=4096\nCRASHMON REBOOT\nCRASHMON BOOT index=1 cmdline=\"\"\nCRASHMON HALT\n";

    #[test]
    fn lines_and_boots() {
        let lines = parse(LOG);
        assert_eq!(lines[0].kind, "BOOT");
        assert_eq!(lines[3].kind, "WAITING nmi");
        let boots = boots(&lines);
        assert_eq!(boots.len(), 2);
        let b = &boots[0];
        assert_eq!(b.bugcheck(), Some((0x80, [0x4f4454, 0, 0, 0])));
        assert_eq!(b.modified_pfns().into_iter().collect::<Vec<_>>(), vec![0x10, 0x11]);
        assert_eq!(b.variable(), Some((0xfffff78000000100, 0x5000100, 0x1234)));
        assert_eq!(b.workload(), Some((0x200000, 0x7fe0000, 0xc4a5)));
        assert_eq!(b.dump_bytes(), Some(4096));
        assert_eq!(b.violations(), vec!["alloc in crashmon-misbehave/SecondaryDumpData"]);
        assert!(boots[1].first("HALT").is_some());
    }
}
