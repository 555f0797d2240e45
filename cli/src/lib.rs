//! The command-line edge every crashmon binary shares (`crashmon-device`, `crashmon-dump`,
//! `crashmon-harness`, `crashmon-slowfs`):
//!
//! - a usage error (unknown flag, bad value) is one line on standard error, `PROGRAM: cause
//!   (see --help)`, and exit status 2; `--help` and `--version` print as clap prints them;
//! - an error at run time is `PROGRAM: what failed: why` (one line unless the error itself
//!   carries more, such as the harness's tail of a QEMU log), and the status the binary chooses.
//!
//! One line, because operators read these in journald and in CI logs, where clap's usage block
//! and tips would bury the cause.

use std::ffi::OsString;
use std::fmt::Display;

/// Parses the process's arguments into `C`; on a usage error prints one line and exits with 2.
pub fn parse<C: clap::Parser>(program: &str) -> C {
    parse_from(program, std::env::args_os())
}

/// [`parse`] over the given arguments (the first is the program's name).
pub fn parse_from<C, I, T>(program: &str, args: I) -> C
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match C::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("{program}: {} (see --help)", one_line(&e.to_string()));
            std::process::exit(2);
        }
    }
}

/// Prints `error` after the program's name and exits with `status`. Give an `anyhow::Error` to
/// have its causes after its context on the same line (`{:#}`).
pub fn fail(program: &str, error: impl Display, status: i32) -> ! {
    eprintln!("{program}: {error:#}");
    std::process::exit(status);
}

/// Folds clap's multi-line message into one line: drops its usage block, its tips, its own
/// pointer to --help (the caller adds one) and its "error:" prefix. Any other multi-line text
/// is joined with spaces.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "prog")]
    struct Cli {
        #[arg(long)]
        count: u8,
    }

    #[test]
    fn clap_errors_fold_into_one_line_without_usage_or_tips() {
        let e = Cli::try_parse_from(["prog", "--count", "300"]).unwrap_err();
        let text = e.to_string();
        assert!(text.lines().count() > 1, "clap's own message is several lines: {text}");
        let line = one_line(&text);
        assert_eq!(line.lines().count(), 1);
        assert!(line.contains("300") && line.contains("--count"), "{line}");
        assert!(!line.contains("error:") && !line.contains("Usage") && !line.contains("--help"));

        let e = Cli::try_parse_from(["prog", "--cuont", "1"]).unwrap_err();
        let line = one_line(&e.to_string());
        assert!(line.contains("--cuont") && !line.contains("tip:"), "{line}");
    }

    #[test]
    fn other_text_is_joined() {
        assert_eq!(one_line("a\n  b\n\nc"), "a b c");
    }
}
