//! Building the driver package with `windows-driver/build.sh`, and loading what it built.

use crate::image::Image;
use crate::map::MapFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository's root (this crate is `<root>/windows-driver/pe-check`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `windows-driver/build.sh` (its progress goes to stderr) and returns the path of
/// `crashmon.sys` it prints last.
pub fn build() -> Result<PathBuf, String> {
    let script = repo_root().join("windows-driver/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}); its output is above",
            script.display(),
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let sys = stdout.lines().last().map(str::trim).unwrap_or_default();
    if sys.is_empty() {
        return Err(format!("{} printed no path", script.display()));
    }
    Ok(PathBuf::from(sys))
}

/// A built driver: the image and its map file.
pub struct Driver {
    /// `crashmon.sys`.
    pub sys: PathBuf,
    /// The package folder (`crashmon.sys`, `crashmon.inf`, `crashmon.map`, `crashmon.pdb`).
    pub dir: PathBuf,
    /// The parsed image.
    pub image: Image,
    /// The parsed map file.
    pub map: MapFile,
}

impl Driver {
    /// Loads `sys` and the `crashmon.map` beside it.
    pub fn load(sys: &Path) -> Result<Self, String> {
        let dir = sys.parent().ok_or("the image has no folder")?.to_owned();
        let bytes =
            std::fs::read(sys).map_err(|e| format!("cannot read {}: {e}", sys.display()))?;
        let image = Image::parse(bytes)?;
        let map_path = sys.with_extension("map");
        let text = std::fs::read_to_string(&map_path)
            .map_err(|e| format!("cannot read {}: {e}", map_path.display()))?;
        let map = MapFile::parse(&text)?;
        if map.preferred_base != image.image_base {
            return Err(format!(
                "{} is not the map of {}: base {:#x}, image base {:#x}",
                map_path.display(),
                sys.display(),
                map.preferred_base,
                image.image_base
            ));
        }
        Ok(Driver { sys: sys.to_owned(), dir, image, map })
    }

    /// The one function whose demangled path has every identifier in `path`, or the exact
    /// `#[no_mangle]` name if `path` has one element that matches exactly.
    pub fn function(&self, path: &[&str]) -> Result<u32, String> {
        if let [name] = path {
            if let Some(s) = self.map.exact(name) {
                return Ok(s.rva);
            }
        }
        let found: Vec<_> = self
            .map
            .with_path(path)
            .into_iter()
            .filter(|s| self.image.section_of(s.rva).is_some_and(|sec| sec.is_executable()))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.rva),
            [] => Err(format!("no function {} in the map", path.join("::"))),
            many => Err(format!(
                "{} functions match {}: {}",
                many.len(),
                path.join("::"),
                many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}
