//! The library behind `crashmon-dump`, the operator's tool for the crash dumps crashmon captured:
//!
//! * [`list`]: the dumps of a folder, through their JSON sidecars;
//! * [`dump`]: one dump and its sidecar, its `DUMP_HEADER64` read through `kdmp-parser`, its
//!   secondary data blocks;
//! * [`verify`]: a dump checked against its sidecar and against itself;
//! * [`bugcheck`]: the names of the well-known bug-check codes.

pub mod bugcheck;
pub mod dump;
pub mod list;
pub mod verify;

use std::path::{Path, PathBuf};
use thiserror::Error;

/// Default folder of `list`, where a packaged device model writes its dumps.
pub const DEFAULT_DUMP_DIR: &str = "/var/lib/crashmon/dumps";

/// What went wrong.
#[derive(Debug, Error)]
pub enum ToolError {
    /// The file named on the command line is not there.
    #[error("{0}: no such file")]
    NoSuchFile(PathBuf),
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why (part of the message, not a chained source, so that it is said once).
        error: std::io::Error,
    },
    /// A `.json` file is not a crashmon sidecar.
    #[error("{path} is not a crashmon sidecar: {message}")]
    BadSidecar {
        /// Which file.
        path: PathBuf,
        /// serde's reason.
        message: String,
    },
    /// A sidecar names a dump that is not there.
    #[error("{sidecar} names the dump {dump}, which is not there")]
    DumpMissing {
        /// The sidecar.
        sidecar: PathBuf,
        /// The dump it names.
        dump: PathBuf,
    },
    /// A tag given on the command line is not a GUID.
    #[error("'{text}' is not a GUID ({message}); write it as {{C4A50D01-6372-4D53-9D6D-6F6E64727631}} or without braces")]
    BadTag {
        /// What was given.
        text: String,
        /// uuid's reason.
        message: String,
    },
    /// No secondary data block has the tag asked for.
    #[error("no secondary data block tagged {tag} in {dump}: {present}")]
    NoSuchTag {
        /// The tag asked for.
        tag: String,
        /// The dump.
        dump: PathBuf,
        /// The tags that are there.
        present: String,
    },
}

impl ToolError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), error }
    }

    /// Whether the error is the user's input rather than the dump's (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::NoSuchFile(_) | Self::BadTag { .. })
    }
}
