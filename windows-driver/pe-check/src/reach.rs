//! What code can run, and what it touches, once a function is entered: a conservative
//! reachability analysis of x64 machine code, decoded with iced-x86.
//!
//! From each root the analysis decodes instructions and follows every control transfer it can
//! resolve: direct calls and jumps (conditional or not), calls and tail jumps through the import
//! address table (recorded as imports), and fall-through. A `ret`, `int3`, `ud2` or unconditional
//! jump ends a path. For every instruction it records the memory it addresses RIP-relatively and
//! any absolute address a base relocation patches into it, so data references are known too.
//!
//! What it does not resolve it reports instead of guessing:
//! * an indirect jump that is not through the IAT (a `match` compiled to a jump table): the
//!   whole enclosing function (from the map file's symbols) is swept linearly and every
//!   instruction in it is treated as reachable, which covers every table target (LLVM keeps
//!   jump-table targets inside the function) at the cost of over-approximating;
//! * an indirect call that is not through the IAT (a function pointer or `dyn` call): listed in
//!   [`Reach::unresolved`]. Code whose address is only taken (`lea`, a relocated constant) is
//!   listed in [`Reach::address_taken`] but not followed: it can only run if something calls
//!   through a pointer, which is exactly what `unresolved` lists. With `unresolved` empty, the
//!   reached set is closed.

use crate::image::Image;
use crate::map::MapFile;
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind,
    Register,
};
use std::collections::{BTreeMap, BTreeSet};

/// The result of [`reach`].
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// Every reached instruction: RVA and length.
    pub instructions: BTreeMap<u32, u8>,
    /// Roots and direct call targets.
    pub functions: BTreeSet<u32>,
    /// Imports called (or whose IAT slot is read), with the RVAs of the instructions.
    pub imports: BTreeMap<String, BTreeSet<u32>>,
    /// Data addressed, by target RVA, with the RVAs of the instructions.
    pub data: BTreeMap<u32, BTreeSet<u32>>,
    /// Code whose address is taken but which is not called directly.
    pub address_taken: BTreeMap<u32, BTreeSet<u32>>,
    /// Indirect calls and jumps that could not be resolved: (RVA, instruction).
    pub unresolved: Vec<(u32, String)>,
    /// Functions swept whole because of a jump table.
    pub swept: BTreeSet<u32>,
    /// Control transfers out of the image's code, undecodable bytes, and the like.
    pub problems: Vec<String>,
    /// `rep movsb` instructions reached (`WRITE_REGISTER_BUFFER_UCHAR`), by RVA.
    pub rep_movsb: BTreeSet<u32>,
    /// `lock or dword ptr [rsp], 0` reached (`FastFence`), by RVA.
    pub fast_fences: BTreeSet<u32>,
}

impl Reach {
    /// The reached instructions' sections, by name, with one example RVA each.
    pub fn sections(&self, image: &Image) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for &rva in self.instructions.keys() {
            let name =
                image.section_of(rva).map_or_else(|| "<none>".to_owned(), |s| s.name.clone());
            out.entry(name).or_insert(rva);
        }
        out
    }
}

fn format(instruction: &Instruction) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(instruction, &mut text);
    text
}

/// Walks the code reachable from `roots` (RVAs of function entries).
pub fn reach(image: &Image, map: &MapFile, roots: &[u32]) -> Reach {
    let mut r = Reach::default();
    let mut work: Vec<u32> = roots.to_vec();
    r.functions.extend(roots.iter().copied());
    while let Some(start) = work.pop() {
        walk_block(image, map, start, &mut r, &mut work);
    }
    r
}

/// Decodes from `start` until the path ends, queueing the targets it finds.
fn walk_block(image: &Image, map: &MapFile, start: u32, r: &mut Reach, work: &mut Vec<u32>) {
    if r.instructions.contains_key(&start) {
        return;
    }
    let Some(section) = image.section_of(start) else {
        r.problems.push(format!("control reaches {start:#x}, outside every section"));
        return;
    };
    if !section.is_executable() {
        r.problems
            .push(format!("control reaches {start:#x} in non-executable section {}", section.name));
        return;
    }
    let Some(bytes) = image.bytes_at(start) else {
        r.problems.push(format!("control reaches {start:#x}, past {}'s bytes", section.name));
        return;
    };
    let base = image.image_base;
    let mut decoder = Decoder::with_ip(64, bytes, base + u64::from(start), DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let rva = (instruction.ip() - base) as u32;
        if r.instructions.contains_key(&rva) {
            return;
        }
        if instruction.is_invalid() {
            r.problems.push(format!("undecodable bytes at {}", map.describe(rva)));
            return;
        }
        r.instructions.insert(rva, instruction.len() as u8);
        note_operands(image, &instruction, rva, r);
        let target = || (instruction.near_branch_target() - base) as u32;
        match instruction.flow_control() {
            FlowControl::Next => {}
            FlowControl::ConditionalBranch => work.push(target()),
            FlowControl::UnconditionalBranch => {
                work.push(target());
                return;
            }
            FlowControl::Call => {
                let t = target();
                r.functions.insert(t);
                work.push(t);
            }
            FlowControl::IndirectCall => {
                if iat_import(image, &instruction, rva, r).is_none() {
                    r.unresolved.push((rva, format(&instruction)));
                }
            }
            FlowControl::IndirectBranch => {
                if iat_import(image, &instruction, rva, r).is_none() {
                    sweep_function(image, map, rva, r, work);
                }
                return;
            }
            FlowControl::Return | FlowControl::Interrupt | FlowControl::Exception => return,
            FlowControl::XbeginXabortXend => {
                r.problems.push(format!("transactional memory at {}", map.describe(rva)))
            }
        }
    }
    r.problems.push(format!("code runs off the end of {} after {start:#x}", section.name));
}

/// Records the import a `call`/`jmp qword ptr [rip+slot]` goes through.
fn iat_import(image: &Image, instruction: &Instruction, rva: u32, r: &mut Reach) -> Option<()> {
    if !instruction.is_ip_rel_memory_operand() {
        return None;
    }
    let slot = image.rva(instruction.ip_rel_memory_address())?;
    let import = image.import_at(slot)?;
    r.imports.entry(import.name.clone()).or_default().insert(rva);
    Some(())
}

/// Records the memory an instruction addresses: RIP-relative operands and relocated constants.
fn note_operands(image: &Image, instruction: &Instruction, rva: u32, r: &mut Reach) {
    if instruction.mnemonic() == Mnemonic::Movsb && instruction.has_rep_prefix() {
        r.rep_movsb.insert(rva);
    }
    if instruction.mnemonic() == Mnemonic::Or
        && instruction.has_lock_prefix()
        && instruction.op0_kind() == OpKind::Memory
        && instruction.memory_base() == Register::RSP
        && instruction.memory_displacement64() == 0
        && instruction.try_immediate(1).is_ok_and(|i| i == 0)
    {
        r.fast_fences.insert(rva);
    }
    let mut targets = Vec::new();
    if instruction.is_ip_rel_memory_operand() && !is_branch(instruction) {
        if let Some(t) = image.rva(instruction.ip_rel_memory_address()) {
            targets.push(t);
        }
    }
    // An absolute address patched by a base relocation inside the instruction's bytes.
    for &reloc in image.dir64_relocations.range(rva..rva + instruction.len() as u32) {
        if let Some(bytes) = image.bytes_at(reloc).and_then(|b| b.get(..8)) {
            let va = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
            if let Some(t) = image.rva(va) {
                targets.push(t);
            }
        }
    }
    for t in targets {
        if let Some(import) = image.import_at(t) {
            // Reading an IAT slot (to call through a register later): count it as a call.
            r.imports.entry(import.name.clone()).or_default().insert(rva);
        } else if image.section_of(t).is_some_and(|s| s.is_executable()) {
            r.address_taken.entry(t).or_default().insert(rva);
        } else {
            r.data.entry(t).or_default().insert(rva);
        }
    }
}

fn is_branch(instruction: &Instruction) -> bool {
    !matches!(instruction.flow_control(), FlowControl::Next)
}

/// A jump table: treats every instruction of the enclosing function as reachable.
fn sweep_function(image: &Image, map: &MapFile, rva: u32, r: &mut Reach, work: &mut Vec<u32>) {
    let (Some(symbol), Some(section)) = (map.symbol_at(rva), image.section_of(rva)) else {
        r.unresolved.push((rva, "indirect jump outside any known function".to_owned()));
        return;
    };
    if !r.swept.insert(symbol.rva) {
        return;
    }
    let end = map.extent_end(symbol.rva, section.rva + section.virtual_size);
    let Some(bytes) = image.bytes_at(symbol.rva) else { return };
    let len = (end - symbol.rva) as usize;
    let mut decoder = Decoder::with_ip(
        64,
        &bytes[..len.min(bytes.len())],
        image.image_base + u64::from(symbol.rva),
        DecoderOptions::NONE,
    );
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        work.push((instruction.ip() - image.image_base) as u32);
    }
}
