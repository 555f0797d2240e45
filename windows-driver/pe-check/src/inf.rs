//! Reading `crashmon.inf` and checking it against the card's datasheet.

use crashmon_card_abi as abi;
use std::collections::BTreeMap;

/// The System setup class's GUID (devguid.h `GUID_DEVCLASS_SYSTEM`).
pub const SYSTEM_CLASS_GUID: &str = "{4d36e97d-e325-11ce-bfc1-08002be10318}";

/// An INF: sections (names lower-cased, as Windows compares them) of `key = value` lines
/// (`value` alone for lines without `=`), comments removed.
#[derive(Debug, Default)]
pub struct Inf {
    /// Sections by lower-cased name.
    pub sections: BTreeMap<String, Vec<(String, String)>>,
}

fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

impl Inf {
    /// Parses INF text.
    pub fn parse(text: &str) -> Inf {
        let mut inf = Inf::default();
        let mut current = String::new();
        for line in text.lines() {
            let line = strip_comment(line).trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = name.trim().to_ascii_lowercase();
                inf.sections.entry(current.clone()).or_default();
                continue;
            }
            let (key, value) = match line.split_once('=') {
                Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
                None => (String::new(), line.to_owned()),
            };
            inf.sections.entry(current.clone()).or_default().push((key, value));
        }
        inf
    }

    /// The lines of a section.
    pub fn section(&self, name: &str) -> &[(String, String)] {
        self.sections.get(&name.to_ascii_lowercase()).map_or(&[], Vec::as_slice)
    }

    /// The value of `key` in `section` (keys compared without case).
    pub fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.section(section)
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches('"')
}

/// Checks the INF: System class, x64 models matching the card's PCI IDs, the service that
/// installs `crashmon.sys` as a demand-start kernel driver.
pub fn check(text: &str) -> Result<String, String> {
    let inf = Inf::parse(text);
    let mut bad = Vec::new();
    let version = |key: &str| inf.value("Version", key).map(unquote).unwrap_or_default().to_owned();
    if version("Signature") != "$WINDOWS NT$" {
        bad.push(format!("[Version] Signature is {:?}", version("Signature")));
    }
    if !version("Class").eq_ignore_ascii_case("System") {
        bad.push(format!("[Version] Class is {:?}, not System", version("Class")));
    }
    if !version("ClassGuid").eq_ignore_ascii_case(SYSTEM_CLASS_GUID) {
        bad.push(format!(
            "[Version] ClassGuid is {:?}, not System's {SYSTEM_CLASS_GUID}",
            version("ClassGuid")
        ));
    }
    if version("CatalogFile").is_empty() || version("DriverVer").is_empty() {
        bad.push("[Version] needs CatalogFile and DriverVer".to_owned());
    }

    // [Manufacturer] names the models section and its x64 decoration.
    let device = format!("PCI\\VEN_{:04X}&DEV_{:04X}", abi::PCI_VENDOR_ID, abi::PCI_DEVICE_ID);
    let subsys = format!(
        "{device}&SUBSYS_{:04X}{:04X}",
        abi::PCI_SUBSYSTEM_ID,
        abi::PCI_SUBSYSTEM_VENDOR_ID
    );
    let mut ids = Vec::new();
    let mut install = None;
    for (_, value) in inf.section("Manufacturer") {
        let mut parts = value.split(',').map(str::trim);
        let models = parts.next().unwrap_or_default();
        for decoration in parts.filter(|d| d.to_ascii_lowercase().starts_with("ntamd64")) {
            for (_, line) in inf.section(&format!("{models}.{decoration}")) {
                let mut fields = line.split(',').map(str::trim);
                let section = fields.next().unwrap_or_default().to_owned();
                for id in fields {
                    ids.push(id.to_ascii_uppercase());
                    install.get_or_insert(section.clone());
                }
            }
        }
    }
    if !ids.contains(&device) {
        bad.push(format!("no x64 model matches {device} (found {ids:?})"));
    }
    if !ids.contains(&subsys) {
        bad.push(format!("no x64 model matches {subsys}"));
    }
    if let Some(other) = ids.iter().find(|id| !id.starts_with(&device)) {
        bad.push(format!("a model matches {other}, which is not the card"));
    }
    let install = install.unwrap_or_default();
    let copies = inf.value(&format!("{install}.NT"), "CopyFiles").unwrap_or_default().to_owned();
    if !copies
        .split(',')
        .any(|c| inf.section(c.trim()).iter().any(|(_, f)| f.eq_ignore_ascii_case("crashmon.sys")))
    {
        bad.push(format!("[{install}.NT] does not copy crashmon.sys"));
    }
    if inf.value("SourceDisksFiles", "crashmon.sys").is_none() {
        bad.push("[SourceDisksFiles] lacks crashmon.sys".to_owned());
    }
    let service =
        inf.value(&format!("{install}.NT.Services"), "AddService").unwrap_or_default().to_owned();
    let fields: Vec<&str> = service.split(',').map(str::trim).collect();
    match fields.as_slice() {
        [name, flags, section, ..] if name.eq_ignore_ascii_case("crashmon") => {
            if u32::from_str_radix(flags.trim_start_matches("0x"), 16).map_or(true, |f| f & 2 == 0)
            {
                bad.push(
                    "AddService lacks SPSVCINST_ASSOCSERVICE (0x2): not the function driver"
                        .to_owned(),
                );
            }
            let get = |k: &str| inf.value(section, k).unwrap_or_default().to_owned();
            if get("ServiceType") != "1" || get("StartType") != "3" {
                bad.push(format!(
                    "[{section}] is not a demand-start kernel driver (ServiceType 1, StartType 3)"
                ));
            }
            if !get("ServiceBinary").to_ascii_lowercase().ends_with("\\crashmon.sys") {
                bad.push(format!("[{section}] ServiceBinary is {:?}", get("ServiceBinary")));
            }
        }
        _ => bad.push(format!(
            "[{install}.NT.Services] does not add the crashmon service: {service:?}"
        )),
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(format!(
        "class System; x64 models {}; installs crashmon.sys as the crashmon kernel service",
        ids.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: &str = include_str!("../../crashmon.inf");

    #[test]
    fn the_driver_inf_passes() {
        check(INF).unwrap();
    }

    #[test]
    fn wrong_ids_class_or_service_are_caught() {
        let other_vendor = INF.replace("VEN_C4A5", "VEN_1AF4");
        assert!(check(&other_vendor).unwrap_err().contains("no x64 model matches"));
        let other_class = INF.replace("Class       = System", "Class       = Net");
        assert!(check(&other_class).unwrap_err().contains("not System"));
        let x86_only = INF.replace("NTamd64.10.0", "NTx86.10.0");
        assert!(check(&x86_only).is_err());
        let boot_start = INF.replace("StartType     = 3", "StartType     = 0");
        assert!(check(&boot_start).unwrap_err().contains("demand-start"));
        let no_assoc = INF.replace("crashmon, 0x00000002,", "crashmon, 0x00000000,");
        assert!(check(&no_assoc).unwrap_err().contains("ASSOCSERVICE"));
    }

    #[test]
    fn comments_and_quoted_semicolons() {
        let inf = Inf::parse("[Strings]\nA = \"x;y\" ; comment\n; whole line\n[b]\nc\n");
        assert_eq!(inf.value("strings", "a"), Some("\"x;y\""));
        assert_eq!(inf.section("B"), &[(String::new(), "c".to_owned())]);
    }
}
