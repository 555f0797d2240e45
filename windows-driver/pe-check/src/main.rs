//! `crashmon-pe-check [--list] [PATH/crashmon.sys]`: runs the checks on a built driver (by
//! default, the one `windows-driver/build.sh` last built) and prints what each saw; `--list`
//! also lists the functions, imports and data the bug-check callbacks reach. Exit status 1 if
//! any check fails.
use clap::Parser;
use crashmon_windows_driver_check::{checks, package};
use std::path::PathBuf;

/// Checks crashmon.sys, the Windows driver, as built: headers, entry point, imports, sections,
/// the bug-check callbacks' call graph, and the INF beside it.
#[derive(Parser, Debug)]
#[command(name = "crashmon-pe-check")]
struct Args {
    /// Also list the functions, imports and data the bug-check callbacks reach.
    #[arg(long)]
    list: bool,
    /// The driver image; by default the one windows-driver/build.sh last built
    /// ($CARGO_TARGET_DIR or <repo>/target, then windows-driver/package/crashmon.sys).
    #[arg(value_name = "PATH/crashmon.sys")]
    sys: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let sys = args.sys.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| package::repo_root().join("target"), PathBuf::from);
        target.join("windows-driver/package/crashmon.sys")
    });
    let driver = match package::Driver::load(&sys) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crashmon-pe-check: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", sys.display());
    let mut failed = 0;
    for (name, outcome) in checks::all(&driver) {
        match outcome {
            Ok(seen) => println!("  ok    {name}: {}", seen.replace('\n', "\n          ")),
            Err(why) => {
                failed += 1;
                println!("  FAIL  {name}:\n          {}", why.replace('\n', "\n          "));
            }
        }
    }
    if args.list {
        match checks::bug_check_listing(&driver) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("{e}"),
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
