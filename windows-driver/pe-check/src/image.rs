//! The facts of a PE32+ image that the checks need, read with the `object` crate.

use object::pe;
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};
use object::LittleEndian as LE;
use std::collections::BTreeSet;

/// One section header.
#[derive(Clone, Debug)]
pub struct Section {
    /// Its name (up to 8 bytes; `PAGE`, `INIT`, `.text`, ...).
    pub name: String,
    /// RVA of its start.
    pub rva: u32,
    /// Size in memory.
    pub virtual_size: u32,
    /// `IMAGE_SCN_*`.
    pub characteristics: u32,
    /// Where its bytes are in the file, and how many there are.
    pub file_offset: u32,
    /// Bytes in the file (the rest of `virtual_size` is zero-filled).
    pub raw_size: u32,
}

impl Section {
    /// Whether `rva` is inside the section in memory.
    pub fn contains(&self, rva: u32) -> bool {
        rva >= self.rva && rva - self.rva < self.virtual_size.max(self.raw_size)
    }

    /// `IMAGE_SCN_MEM_EXECUTE`.
    pub fn is_executable(&self) -> bool {
        self.characteristics & pe::IMAGE_SCN_MEM_EXECUTE.0 != 0
    }

    /// `IMAGE_SCN_MEM_WRITE`.
    pub fn is_writable(&self) -> bool {
        self.characteristics & pe::IMAGE_SCN_MEM_WRITE.0 != 0
    }

    /// `IMAGE_SCN_MEM_DISCARDABLE`.
    pub fn is_discardable(&self) -> bool {
        self.characteristics & pe::IMAGE_SCN_MEM_DISCARDABLE.0 != 0
    }

    /// The kernel pages a driver's sections whose name starts with `PAGE` (`PAGE`, `PAGELK`,
    /// `PAGEDATA`, ...), like code in `#pragma alloc_text(PAGE, ...)`.
    pub fn is_pageable(&self) -> bool {
        self.name.starts_with("PAGE")
    }

    /// The kernel frees a driver's `INIT` section after `DriverEntry` returns.
    pub fn is_init(&self) -> bool {
        self.name.starts_with("INIT")
    }

    /// Resident for as long as the driver is loaded: not pageable, not `INIT`, not discardable.
    /// Code and data that a bug-check callback touches must be in such a section.
    pub fn is_resident(&self) -> bool {
        !self.is_pageable() && !self.is_init() && !self.is_discardable()
    }
}

/// One imported routine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// The DLL it comes from, as written in the image.
    pub dll: String,
    /// Its name (or `#ordinal`).
    pub name: String,
    /// RVA of its slot in the import address table.
    pub iat_rva: u32,
}

/// A parsed driver image.
pub struct Image {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// `IMAGE_FILE_HEADER.Machine`.
    pub machine: u16,
    /// `IMAGE_FILE_HEADER.Characteristics`.
    pub file_characteristics: u16,
    /// Optional header magic (0x20b for PE32+).
    pub magic: u16,
    /// `Subsystem`.
    pub subsystem: u16,
    /// `DllCharacteristics`.
    pub dll_characteristics: u16,
    /// `AddressOfEntryPoint`.
    pub entry_rva: u32,
    /// `ImageBase`.
    pub image_base: u64,
    /// `SectionAlignment`.
    pub section_alignment: u32,
    /// `CheckSum` as stored.
    pub checksum: u32,
    /// The checksum computed from the file (`CheckSumMappedFile`'s algorithm).
    pub computed_checksum: u32,
    /// Section headers, in order.
    pub sections: Vec<Section>,
    /// Every imported routine.
    pub imports: Vec<Import>,
    /// DLLs named by the delay-load import table.
    pub delay_load_dlls: Vec<String>,
    /// Exported names and their RVAs.
    pub exports: Vec<(String, u32)>,
    /// RVAs patched by `IMAGE_REL_BASED_DIR64` base relocations.
    pub dir64_relocations: BTreeSet<u32>,
    /// Base relocations of any other type (none are expected on x64).
    pub other_relocations: usize,
    /// Size of the TLS directory (a kernel driver cannot have thread-local storage).
    pub tls_size: u32,
}

/// The PE checksum (`CheckSumMappedFile`): the 16-bit one's-complement-style sum of the file
/// without its `CheckSum` field, plus the file's length.
pub fn pe_checksum(bytes: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, pair) in bytes.chunks(2).enumerate() {
        let at = i * 2;
        if at == checksum_offset || at == checksum_offset + 2 {
            continue;
        }
        sum += u64::from(pair[0]) | u64::from(pair.get(1).copied().unwrap_or(0)) << 8;
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum = (sum & 0xFFFF) + (sum >> 16);
    (sum as u32).wrapping_add(bytes.len() as u32)
}

fn err(context: &str) -> impl FnOnce(object::read::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

impl Image {
    /// Parses a PE32+ image.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        let file = PeFile64::parse(&*bytes).map_err(err("not a PE32+ image"))?;
        let nt = file.nt_headers();
        let header = nt.file_header();
        let optional = nt.optional_header();
        let e_lfanew = file.dos_header().nt_headers_offset() as usize;
        // Signature (4) + IMAGE_FILE_HEADER (20) + the CheckSum's offset in the optional header.
        let checksum_offset = e_lfanew + 4 + pe::IMAGE_SIZEOF_FILE_HEADER + 64;

        let table = file.section_table();
        let sections = table
            .iter()
            .map(|s| Section {
                name: String::from_utf8_lossy(s.name.split(|b| *b == 0).next().unwrap_or(&[]))
                    .into_owned(),
                rva: s.virtual_address.get(LE),
                virtual_size: s.virtual_size.get(LE),
                characteristics: s.characteristics.get(LE).0,
                file_offset: s.pointer_to_raw_data.get(LE),
                raw_size: s.size_of_raw_data.get(LE),
            })
            .collect();

        let mut imports = Vec::new();
        if let Some(table) = file.import_table().map_err(err("bad import table"))? {
            let mut descriptors = table.descriptors().map_err(err("bad import descriptors"))?;
            while let Some(d) = descriptors.next().map_err(err("bad import descriptor"))? {
                let dll = String::from_utf8_lossy(
                    table.name(d.name.get(LE)).map_err(err("bad DLL name"))?,
                )
                .into_owned();
                let first_thunk = d.first_thunk.get(LE);
                let lookup = match d.original_first_thunk.get(LE) {
                    0 => first_thunk,
                    n => n,
                };
                let mut thunks = table.thunks(lookup).map_err(err("bad import thunks"))?;
                let mut index = 0u32;
                while let Some(thunk) =
                    thunks.next::<pe::ImageNtHeaders64>().map_err(err("bad thunk"))?
                {
                    let name = match table
                        .import::<pe::ImageNtHeaders64>(thunk)
                        .map_err(err("bad import"))?
                    {
                        object::read::pe::Import::Name(_, name) => {
                            String::from_utf8_lossy(name).into_owned()
                        }
                        object::read::pe::Import::Ordinal(n) => format!("#{n}"),
                    };
                    imports.push(Import {
                        dll: dll.clone(),
                        name,
                        iat_rva: first_thunk + 8 * index,
                    });
                    index += 1;
                }
            }
        }

        let mut delay_load_dlls = Vec::new();
        if let Some(table) = file.delay_load_import_table().map_err(err("bad delay-load table"))? {
            let mut descriptors = table.descriptors().map_err(err("bad delay-load descriptors"))?;
            while let Some(d) = descriptors.next().map_err(err("bad delay-load descriptor"))? {
                let name =
                    table.name(d.dll_name_rva.get(LE)).map_err(err("bad delay-load DLL name"))?;
                delay_load_dlls.push(String::from_utf8_lossy(name).into_owned());
            }
        }

        let mut exports = Vec::new();
        if let Some(table) = file.export_table().map_err(err("bad export table"))? {
            for e in table.exports().map_err(err("bad exports"))? {
                if let (Some(name), object::read::pe::ExportTarget::Address(rva)) =
                    (e.name, e.target)
                {
                    exports.push((String::from_utf8_lossy(name).into_owned(), rva));
                }
            }
        }

        let mut dir64_relocations = BTreeSet::new();
        let mut other_relocations = 0;
        let directories = file.data_directories();
        if let Some(mut blocks) =
            directories.relocation_blocks(&*bytes, &table).map_err(err("bad base relocations"))?
        {
            while let Some(block) = blocks.next().map_err(err("bad relocation block"))? {
                for r in block {
                    match r.typ {
                        pe::IMAGE_REL_BASED_DIR64 => {
                            dir64_relocations.insert(r.virtual_address);
                        }
                        pe::IMAGE_REL_BASED_ABSOLUTE => {}
                        _ => other_relocations += 1,
                    }
                }
            }
        }
        let tls_size = directories.get(pe::IMAGE_DIRECTORY_ENTRY_TLS).map_or(0, |d| d.size.get(LE));

        let computed_checksum = pe_checksum(&bytes, checksum_offset);
        Ok(Image {
            machine: header.machine.get(LE).0,
            file_characteristics: header.characteristics.get(LE).0,
            magic: optional.magic(),
            subsystem: optional.subsystem().0,
            dll_characteristics: optional.dll_characteristics().0,
            entry_rva: optional.address_of_entry_point(),
            image_base: optional.image_base(),
            section_alignment: optional.section_alignment(),
            checksum: optional.check_sum(),
            computed_checksum,
            sections,
            imports,
            delay_load_dlls,
            exports,
            dir64_relocations,
            other_relocations,
            tls_size,
            bytes,
        })
    }

    /// The section holding `rva`.
    pub fn section_of(&self, rva: u32) -> Option<&Section> {
        self.sections.iter().find(|s| s.contains(rva))
    }

    /// The file bytes from `rva` to the end of its section's raw data.
    pub fn bytes_at(&self, rva: u32) -> Option<&[u8]> {
        let s = self.section_of(rva)?;
        let skip = rva - s.rva;
        if skip >= s.raw_size {
            return None;
        }
        let start = (s.file_offset + skip) as usize;
        let end = (s.file_offset + s.raw_size) as usize;
        self.bytes.get(start..end)
    }

    /// The import whose IAT slot is at `rva`.
    pub fn import_at(&self, rva: u32) -> Option<&Import> {
        self.imports.iter().find(|i| i.iat_rva == rva)
    }

    /// The RVA of an exported name.
    pub fn export(&self, name: &str) -> Option<u32> {
        self.exports.iter().find(|(n, _)| n == name).map(|(_, rva)| *rva)
    }

    /// Converts a virtual address at the preferred base into an RVA.
    pub fn rva(&self, va: u64) -> Option<u32> {
        va.checked_sub(self.image_base).and_then(|r| u32::try_from(r).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_folds_carries_skips_its_field_and_adds_the_length() {
        // Words 0x0001, 0xFFFF (carry folds back: 0x0001), then the skipped field, then 0x0002.
        let bytes = [0x01, 0x00, 0xFF, 0xFF, 0xAA, 0xBB, 0xCC, 0xDD, 0x02, 0x00];
        assert_eq!(pe_checksum(&bytes, 4), 0x0003 + 10);
        // An odd length pads the last byte with zero.
        assert_eq!(pe_checksum(&[0x10, 0x00, 0x20], 100), 0x30 + 3);
    }
}
