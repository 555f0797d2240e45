//! The linker's map file (`/MAP`), which names the image's functions: lld-link writes it in
//! link.exe's format.
//!
//! ```text
//!  Preferred load address is 0000000180000000
//!   Address         Publics by Value              Rva+Base               Lib:Object
//!  0005:00000000       DriverEntry                0000000180006000     crashmon...rcgu.o
//!  Static symbols
//!  0001:00000030       _RNvMs1_...15dump_io_routine... 0000000180001030     crashmon...rcgu.o
//! ```

/// One symbol: a function, a static or an import slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The (mangled) name, as the map has it and reports print it.
    pub name: String,
    /// The name demangled by `rustc-demangle` (legacy or v0 mangling), without the hash; the
    /// name itself when it is not a Rust symbol (`DriverEntry`, `__imp_...`).
    pub demangled: String,
    /// Its RVA.
    pub rva: u32,
    /// The 1-based section number it is in.
    pub section: u16,
}

/// A parsed map file.
#[derive(Clone, Debug)]
pub struct MapFile {
    /// "Preferred load address is ...".
    pub preferred_base: u64,
    /// Every public and static symbol, by RVA.
    pub symbols: Vec<Symbol>,
}

impl MapFile {
    /// Parses lld-link's (or link.exe's) map file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut preferred_base = None;
        let mut symbols = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("Preferred load address is ") {
                preferred_base = Some(
                    u64::from_str_radix(rest.trim(), 16)
                        .map_err(|e| format!("bad preferred load address {rest:?}: {e}"))?,
                );
                continue;
            }
            // "ssss:oooooooo  name  rva+base  object": a symbol line has a section:offset first
            // and a 16-digit address third.
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 3 {
                continue;
            }
            let Some((section, _offset)) = fields[0].split_once(':') else { continue };
            let (Ok(section), Ok(va)) =
                (u16::from_str_radix(section, 16), u64::from_str_radix(fields[2], 16))
            else {
                continue;
            };
            if fields[2].len() != 16 {
                // The section table at the top ("0001:00000000 000015dcH .text CODE").
                continue;
            }
            let base = preferred_base.ok_or("symbol before the preferred load address")?;
            let rva = va
                .checked_sub(base)
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| format!("symbol {} at {va:#x} is not in the image", fields[1]))?;
            let name = fields[1].to_owned();
            let demangled = format!("{:#}", rustc_demangle::demangle(&name));
            symbols.push(Symbol { name, demangled, rva, section });
        }
        let preferred_base =
            preferred_base.ok_or("no \"Preferred load address\" line: not a link.exe-style map")?;
        symbols.sort_by_key(|s| s.rva);
        symbols.dedup();
        Ok(MapFile { preferred_base, symbols })
    }

    /// The symbol named exactly `name`.
    pub fn exact(&self, name: &str) -> Option<&Symbol> {
        self.symbols.iter().find(|s| s.name == name)
    }

    /// Symbols whose demangled path names every identifier of `path`, in any position
    /// (`["CrashmonDriver", "dump_io_routine"]` finds
    /// `<crashmon_guest_driver::driver::CrashmonDriver<crashmon::mmio::MmioCardIo>>::dump_io_routine`).
    pub fn with_path(&self, path: &[&str]) -> Vec<&Symbol> {
        self.symbols
            .iter()
            .filter(|s| path.iter().all(|p| identifiers(&s.demangled).any(|i| i == *p)))
            .collect()
    }

    /// The symbol `rva` is in: the last one at or before it in the same section (the map has no
    /// sizes).
    pub fn symbol_at(&self, rva: u32) -> Option<&Symbol> {
        self.symbols.iter().take_while(|s| s.rva <= rva).last()
    }

    /// Where the symbol at `start` ends: at the next symbol, or at `limit` (its section's end).
    pub fn extent_end(&self, start: u32, limit: u32) -> u32 {
        self.symbols.iter().map(|s| s.rva).find(|&r| r > start).map_or(limit, |r| r.min(limit))
    }

    /// A name for `rva` in reports: `symbol+offset`.
    pub fn describe(&self, rva: u32) -> String {
        match self.symbol_at(rva) {
            Some(s) if s.rva == rva => format!("{} ({rva:#x})", s.name),
            Some(s) => format!("{}+{:#x} ({rva:#x})", s.name, rva - s.rva),
            None => format!("{rva:#x}"),
        }
    }
}

/// The identifiers in a demangled Rust path: what is between `::`, `<`, `>`, `,`, `&`, spaces
/// and the like.
fn identifiers(demangled: &str) -> impl Iterator<Item = &str> {
    demangled.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|i| !i.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = " crashmon

 Timestamp is 6b027020 (Sun Nov 22 04:31:28 2026)

 Preferred load address is 0000000180000000

 Start         Length     Name                   Class
 0001:00000000 000015dcH .text                   CODE
 0005:00000000 000000f0H INIT                    CODE

  Address         Publics by Value              Rva+Base               Lib:Object

 0001:00000000       _RNvCs_7___rustc17rust_begin_unwind 0000000180001000     a.o
 0005:00000000       DriverEntry                0000000180006000     a.o

 entry point at         0005:00000000

 Static symbols

 0001:00000030       _RNvMs1_NtCs_21crashmon_guest_driver6driverINtB5_14CrashmonDriverNtNtCs_8crashmon4mmio10MmioCardIoE15dump_io_routineB1f_ 0000000180001030     a.o
";

    #[test]
    fn parses_publics_and_statics() {
        let map = MapFile::parse(MAP).unwrap();
        assert_eq!(map.preferred_base, 0x1_8000_0000);
        assert_eq!(map.symbols.len(), 3);
        assert_eq!(map.exact("DriverEntry").map(|s| (s.rva, s.section)), Some((0x6000, 5)));
        let found = map.with_path(&["CrashmonDriver", "dump_io_routine"]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rva, 0x1030);
        assert_eq!(map.symbol_at(0x1040).unwrap().rva, 0x1030);
        assert_eq!(map.extent_end(0x1000, 0x2000), 0x1030);
        assert_eq!(map.extent_end(0x1030, 0x25dc), 0x25dc);
        assert!(map.describe(0x1034).ends_with("+0x4 (0x1034)"));
    }

    #[test]
    fn refuses_text_without_a_base() {
        assert!(MapFile::parse("nothing here").is_err());
    }
}
