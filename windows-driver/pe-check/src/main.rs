//! `crashmon-pe-check [--list] [PATH/crashmon.sys]`: runs the checks on a built driver (by
//! default, the one `windows-driver/build.sh` last built) and prints what each saw; `--list`
//! also lists the functions, imports and data the bug-check callbacks reach. Exit status 1 if
//! any check fails.
use crashmon_windows_driver_check::{checks, package};
use std::path::PathBuf;

fn main() {
    let mut args: Vec<_> = std::env::args_os().skip(1).collect();
    let listing = args.iter().any(|a| a == "--list");
    args.retain(|a| a != "--list");
    let sys = args.first().map(PathBuf::from).unwrap_or_else(|| {
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
    if listing {
        match checks::bug_check_listing(&driver) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("{e}"),
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
