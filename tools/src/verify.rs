//! `verify`: a dump against its sidecar and against itself.

use crate::dump::{self, DumpBytes, Located};
use crate::{bugcheck, ToolError};
use crashmon_device_model::capture::{DumpState, Sidecar, COMPLETE_SUFFIX, INCOMPLETE_SUFFIX};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::os::fd::AsRawFd;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It passed.
    Ok,
    /// It failed.
    Fail,
    /// It does not apply to this dump (for example RequiredDumpSpace of an incomplete one).
    Skip,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Short name: `sidecar`, `sha256`, `parse`, `size`, `holes`, `required-dump-space`,
    /// `bugcheck`.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// What was compared.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, ok: bool, detail: String) -> Self {
        Self { name, outcome: if ok { Outcome::Ok } else { Outcome::Fail }, detail }
    }
    fn skip(name: &'static str, detail: String) -> Self {
        Self { name, outcome: Outcome::Skip, detail }
    }
}

/// Whether every check passed (or did not apply).
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Fail)
}

/// Runs every check on the dump `located` names.
pub fn verify(located: &Located) -> Result<Vec<Check>, ToolError> {
    let mut checks = Vec::new();
    let bytes = DumpBytes::open(&located.dump)?;
    let data = bytes.bytes();
    let file_size = data.len() as u64;
    let sidecar = match &located.sidecar {
        Some(Ok(s)) => {
            let name = located
                .sidecar_path
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let state = format!("{:?}", s.state).to_lowercase();
            checks.push(Check::new("sidecar", true, format!("{name} (VM {}, {state})", s.vm_name)));
            Some(s)
        }
        Some(Err(e)) => {
            checks.push(Check::new("sidecar", false, e.clone()));
            None
        }
        None => {
            checks.push(Check::new("sidecar", false, "no sidecar next to the dump".into()));
            None
        }
    };

    if let Some(sc) = sidecar {
        let actual = hex::encode(Sha256::digest(data));
        checks.push(match sc.sha256.as_deref() {
            Some(want) if want.eq_ignore_ascii_case(&actual) => {
                Check::new("sha256", true, format!("{actual} as the sidecar records"))
            }
            Some(want) => Check::new("sha256", false, format!("file {actual}, sidecar {want}")),
            None => Check::new(
                "sha256",
                false,
                format!("the sidecar records no sha256 (state {:?}); file {actual}", sc.state),
            ),
        });
    }

    let parsed = dump::parse(&located.dump);
    checks.push(match &parsed {
        Ok(p) => Check::new(
            "parse",
            true,
            format!("kdmp-parser reads a {:?} dump of {} pages", p.dump_type(), p.physmem().len()),
        ),
        Err(e) => Check::new("parse", false, format!("kdmp-parser: {e}")),
    });

    if let Some(sc) = sidecar {
        checks.push(Check::new(
            "size",
            sc.size == file_size,
            format!("file {file_size} bytes, sidecar {}", sc.size),
        ));
        checks.push(holes(&bytes, sc)?);
    }

    if let Ok(p) = &parsed {
        let required = p.headers().required_dump_space;
        let complete = match sidecar {
            Some(s) => s.state == DumpState::Complete,
            None => {
                let name = located.dump.to_string_lossy();
                name.ends_with(COMPLETE_SUFFIX) && !name.ends_with(INCOMPLETE_SUFFIX)
            }
        };
        checks.push(if complete {
            Check::new(
                "required-dump-space",
                required == file_size as i64,
                format!("RequiredDumpSpace {required}, file {file_size} bytes"),
            )
        } else {
            Check::skip(
                "required-dump-space",
                format!("RequiredDumpSpace {required}, file {file_size} bytes: not complete"),
            )
        });
        if let Some(sc) = sidecar {
            let h = p.headers();
            let header_code = bugcheck::describe(h.bug_check_code);
            checks.push(match &sc.bugcheck {
                None => Check::new(
                    "bugcheck",
                    false,
                    format!("header {header_code}, the sidecar records none"),
                ),
                Some(b) => {
                    let code = bugcheck::parse_code(&b.code);
                    let params: Vec<Option<u64>> =
                        b.parameters.iter().map(|p| parse_u64(p)).collect();
                    let same_params =
                        params.iter().zip(h.bug_check_code_parameters).all(|(s, h)| *s == Some(h));
                    if code == Some(h.bug_check_code) && same_params {
                        Check::new(
                            "bugcheck",
                            true,
                            format!("{header_code} and its 4 parameters, as the sidecar records"),
                        )
                    } else {
                        Check::new(
                            "bugcheck",
                            false,
                            format!(
                                "header {header_code} {:x?}, sidecar {} {:?}",
                                h.bug_check_code_parameters, b.code, b.parameters
                            ),
                        )
                    }
                }
            });
        }
    }
    Ok(checks)
}

fn parse_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// The ranges of the file the filesystem holds no data for (never written), `[start, end)`,
/// through `SEEK_DATA`/`SEEK_HOLE`. A filesystem without them reports none.
pub fn filesystem_holes(file: &std::fs::File, size: u64) -> Vec<[u64; 2]> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut holes = Vec::new();
    let mut at = 0u64;
    while at < size {
        let data = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(_) => return holes,
        };
        if data > at {
            holes.push([at, data]);
        }
        if data >= size {
            break;
        }
        at = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(h) if h as u64 > data => h as u64,
            _ => return holes,
        };
    }
    holes
}

/// Holes only where the sidecar declares them: the filesystem's holes (ranges never written)
/// must lie in the declared `missing_ranges`, and those must read as zeros, except for the zero
/// pages the device model left out as holes (at most `zero_bytes_skipped` bytes in all; they
/// read as the zeros the guest sent). A complete dump declares no missing range.
fn holes(bytes: &DumpBytes, sc: &Sidecar) -> Result<Check, ToolError> {
    let data = bytes.bytes();
    let size = data.len() as u64;
    let declared = &sc.missing_ranges;
    let listed: u64 = declared.iter().map(|[s, e]| e.saturating_sub(*s)).sum();
    if sc.state == DumpState::Complete && (listed > 0 || sc.missing_bytes.is_some_and(|m| m > 0)) {
        return Ok(Check::new(
            "holes",
            false,
            format!(
                "a complete dump whose sidecar declares {:?} missing bytes in {} ranges",
                sc.missing_bytes,
                declared.len()
            ),
        ));
    }
    for &[s, e] in declared {
        let range = usize::try_from(s).ok().zip(usize::try_from(e).ok());
        match range.and_then(|(s, e)| data.get(s..e)) {
            Some(r) if s < e => {
                if let Some(i) = r.iter().position(|&b| b != 0) {
                    return Ok(Check::new(
                        "holes",
                        false,
                        format!("declared hole [{s:#x}, {e:#x}) holds data at {:#x}", s + i as u64),
                    ));
                }
            }
            _ => {
                return Ok(Check::new(
                    "holes",
                    false,
                    format!(
                        "declared hole [{s:#x}, {e:#x}) is not within the file of {size} bytes"
                    ),
                ))
            }
        }
    }
    // Holes past the last listed one are declared in aggregate when the list was cut short
    // (`missing_bytes` larger than the listed ranges) or not tracked at all.
    let untracked = sc.missing_bytes.is_none();
    let truncated = sc.missing_bytes.is_some_and(|m| m > listed);
    let listed_end = declared.iter().map(|r| r[1]).max().unwrap_or(0);
    let fs_holes = filesystem_holes(&bytes.file, size);
    let in_holes: u64 = fs_holes.iter().map(|[s, e]| e - s).sum();
    // Holes no declared range covers: the first of them, and their total.
    let mut undeclared: Option<[u64; 2]> = None;
    let mut undeclared_bytes = 0u64;
    for &[s, e] in &fs_holes {
        if untracked || (truncated && s >= listed_end) {
            continue;
        }
        // What of [s, e) no declared range covers.
        let mut at = s;
        let mut ranges: Vec<[u64; 2]> = declared.clone();
        ranges.sort_unstable();
        for [ds, de] in ranges {
            if ds <= at && de > at {
                at = de;
            }
        }
        if at < e {
            undeclared.get_or_insert([at, e]);
            undeclared_bytes += e - at;
        }
    }
    if let Some([at, e]) = undeclared.filter(|_| undeclared_bytes > sc.zero_bytes_skipped) {
        return Ok(Check::new(
            "holes",
            false,
            format!(
                "[{at:#x}, {e:#x}) ({} bytes) was never written, and the sidecar does not \
                 declare it missing ({undeclared_bytes} such bytes, {} of zero pages left as \
                 holes)",
                e - at,
                sc.zero_bytes_skipped
            ),
        ));
    }
    let sparse = if undeclared_bytes > 0 {
        format!(
            "; {undeclared_bytes} bytes of zero pages left as holes (the sidecar records {})",
            sc.zero_bytes_skipped
        )
    } else {
        String::new()
    };
    let detail = if untracked {
        format!("{in_holes} bytes in holes; the sidecar did not track missing ranges")
    } else if declared.is_empty() && undeclared_bytes == 0 {
        "none: every byte was written".to_owned()
    } else if declared.is_empty() {
        format!("none missing{sparse}")
    } else {
        format!(
            "{} declared missing ranges ({} bytes) read as zeros; {in_holes} bytes never written, \
             all declared{sparse}",
            declared.len(),
            listed
        )
    };
    Ok(Check::new("holes", true, detail))
}
