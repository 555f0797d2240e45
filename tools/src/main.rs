//! `crashmon-dump`: list, inspect, verify and extract from the crash dumps crashmon captured.

use anyhow::Result;
use clap::{Parser, Subcommand};
use crashmon_tools::dump::{self, Inspection};
use crashmon_tools::verify::{self, Outcome};
use crashmon_tools::{bugcheck, list, ToolError, DEFAULT_DUMP_DIR};
use std::io::Write;
use std::path::PathBuf;

/// Looks at the crash dumps crashmon captured: `<vm>-<UTC time>-<uuid>.dmp` (or
/// `.incomplete.dmp`, `.dmp.partial`) with their JSON sidecars.
#[derive(Parser, Debug)]
#[command(name = "crashmon-dump", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One line per dump in DIR, found through its sidecar, oldest first.
    List {
        /// The device model's output folder.
        #[arg(default_value = DEFAULT_DUMP_DIR)]
        dir: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The dump's header (through kdmp-parser), physical memory, secondary data and sidecar.
    Inspect {
        /// A dump, or its sidecar (.json).
        file: PathBuf,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Checks the dump against its sidecar (sha256, size, holes, bug check) and itself; exits 0
    /// only if every check passes, 1 if one fails.
    Verify {
        /// A dump, or its sidecar (.json).
        file: PathBuf,
    },
    /// Writes one secondary data block's bytes (as WinDbg's .readtag gives them).
    Extract {
        /// The block's tag, a GUID with or without braces.
        #[arg(long, value_name = "GUID")]
        tag: String,
        /// A dump, or its sidecar (.json).
        file: PathBuf,
        /// Where to write the bytes (default: standard output).
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
    },
}

fn main() {
    let cli: Cli = crashmon_cli::parse("crashmon-dump");
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let usage = e.downcast_ref::<ToolError>().is_some_and(ToolError::is_usage);
            crashmon_cli::fail("crashmon-dump", e, if usage { 2 } else { 1 });
        }
    }
}

/// Runs a command; the exit status on success.
fn run(cli: Cli) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::List { dir, json } => {
            let (entries, notes) = list::scan(&dir)?;
            for note in notes {
                eprintln!("crashmon-dump: {note}");
            }
            if json {
                for e in &entries {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
            } else {
                for line in list::render(&entries) {
                    writeln!(out, "{line}")?;
                }
            }
        }
        Command::Inspect { file, json } => {
            let located = dump::locate(&file)?;
            let inspection = dump::inspect(&located)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&inspection)?)?;
            } else {
                write!(out, "{}", render_inspection(&inspection))?;
            }
        }
        Command::Verify { file } => {
            let located = dump::locate(&file)?;
            let checks = verify::verify(&located)?;
            for c in &checks {
                let status = match c.outcome {
                    Outcome::Ok => "ok  ",
                    Outcome::Fail => "FAIL",
                    Outcome::Skip => "skip",
                };
                writeln!(out, "{status}  {:<20} {}", c.name, c.detail)?;
            }
            return Ok(if verify::all_passed(&checks) { 0 } else { 1 });
        }
        Command::Extract { tag, file, output } => {
            let tag = dump::parse_tag(&tag)?;
            let located = dump::locate(&file)?;
            let data = dump::extract(&located, &tag)?;
            match output {
                Some(path) => std::fs::write(&path, &data).map_err(|e| ToolError::io(&path, e))?,
                None => out.write_all(&data)?,
            }
        }
    }
    out.flush()?;
    Ok(0)
}

fn render_inspection(i: &Inspection) -> String {
    let mut s = format!("file                   {} ({} bytes)\n", i.file, i.file_size);
    match (&i.header, &i.parse_error) {
        (Some(h), _) => {
            let name =
                |n: &Option<String>| n.clone().unwrap_or_else(|| "(unknown bug check)".into());
            s += &format!("signature              {}\n", h.signature);
            s += &format!("dump type              {} ({})\n", h.dump_type, h.dump_type_name);
            s += &format!("version                {}.{}\n", h.major_version, h.minor_version);
            s += &format!("DirectoryTableBase     {}\n", h.directory_table_base);
            s += &format!("PfnDataBase            {}\n", h.pfn_database);
            s += &format!("PsLoadedModuleList     {}\n", h.ps_loaded_module_list);
            s += &format!("PsActiveProcessHead    {}\n", h.ps_active_process_head);
            s += &format!("KdDebuggerDataBlock    {}\n", h.kd_debugger_data_block);
            s += &format!("MachineImageType       {}\n", h.machine_image_type);
            s += &format!("NumberProcessors       {}\n", h.number_processors);
            s +=
                &format!("bug check              {} {}\n", h.bugcheck.code, name(&h.bugcheck.name));
            s += &format!("  parameters           {}\n", h.bugcheck.parameters.join(" "));
            s += &format!("RequiredDumpSpace      {}\n", h.required_dump_space);
            s += &format!(
                "SystemTime             {}\n",
                h.system_time.as_deref().unwrap_or("(not set)")
            );
        }
        (None, Some(e)) => {
            s += &format!("header                 kdmp-parser cannot parse it: {e}\n")
        }
        (None, None) => {}
    }
    if let Some(m) = &i.physical_memory {
        s += &format!(
            "physical memory        {} pages in {} runs; the dump holds {} pages ({}) in {} runs\n",
            m.header_pages,
            m.header_runs.len(),
            m.pages,
            list::human_size(m.pages * 0x1000),
            m.present_runs
        );
        for r in &m.header_runs {
            s += &format!(
                "  run                  pfn {:#x}..{:#x} ({} pages)\n",
                r.base_page,
                r.base_page + r.page_count,
                r.page_count
            );
        }
    }
    if i.secondary_data.is_empty() {
        s += "secondary data         none\n";
    } else {
        s += &format!("secondary data         {} blocks\n", i.secondary_data.len());
        for b in &i.secondary_data {
            s += &format!("  {}  {} bytes at {:#x}\n", b.tag, b.size, b.offset);
        }
    }
    match (&i.sidecar, &i.sidecar_error) {
        (Some(sc), _) => {
            s += &format!("sidecar                {}\n", i.sidecar_file.as_deref().unwrap_or(""));
            s += &format!("  vm                   {}\n", sc.vm_name);
            s += &format!("  session              {}\n", sc.session_id);
            let state = format!("{:?}", sc.state).to_lowercase();
            match &sc.incomplete_reason {
                Some(why) => s += &format!("  state                {state}: {why}\n"),
                None => s += &format!("  state                {state}\n"),
            }
            if let Some(b) = &sc.bugcheck {
                let code = bugcheck::parse_code(&b.code)
                    .map(bugcheck::describe)
                    .unwrap_or_else(|| b.code.clone());
                s += &format!("  bug check            {code} ({:?})\n", b.source);
            }
            s += &format!(
                "  time                 {} .. {}\n",
                crashmon_device_model::capture::sidecar_time::text(&sc.started_at),
                sc.ended_at.as_ref().map_or(
                    "(still streaming)".into(),
                    crashmon_device_model::capture::sidecar_time::text
                )
            );
            s += &format!(
                "  size                 {} bytes, {} received in {} chunks ({:?})\n",
                sc.size, sc.bytes_received, sc.chunks, sc.write_order
            );
            let missing = sc.missing_bytes.map_or("untracked".into(), |m| m.to_string());
            s += &format!(
                "  missing              {missing} bytes in {} listed ranges\n",
                sc.missing_ranges.len()
            );
            if sc.rejected_chunks > 0 || sc.write_errors > 0 {
                s += &format!(
                    "  errors               {} refused chunks, {} write errors\n",
                    sc.rejected_chunks, sc.write_errors
                );
            }
            s += &format!(
                "  sha256               {}\n",
                sc.sha256.as_deref().unwrap_or("(none yet)")
            );
        }
        (None, Some(e)) => s += &format!("sidecar                unreadable: {e}\n"),
        (None, None) => s += "sidecar                none\n",
    }
    s
}
