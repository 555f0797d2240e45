// Copyright © 2021 Intel Corporation
//
// SPDX-License-Identifier: Apache-2.0
//

use bitflags::bitflags;
use libc::{c_void, iovec, EINVAL, EIO, ENOTSUP};
use libc::{sysconf, _SC_PAGESIZE};
use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::mem::size_of;
use std::num::Wrapping;
use std::os::fd::OwnedFd;
use std::os::unix::{
    io::{FromRawFd, RawFd},
    net::{UnixListener, UnixStream},
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;
use vfio_bindings::bindings::vfio::*;
use vm_memory::{ByteValued, FileOffset};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[macro_use]
extern crate serde_derive;

#[macro_use]
extern crate log;

#[allow(dead_code)]
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, enumn::N)]
pub enum Command {
    #[default]
    Unknown = 0,
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    GetRegionIoFds = 6,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    UserDirtyPages = 14,
}

#[allow(dead_code)]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum HeaderFlags {
    #[default]
    Command = 0,
    Reply = 1,
    NoReply = 1 << 4,
    Error = 1 << 5,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct Header {
    message_id: u16,
    command: u16,
    message_size: u32,
    flags: u32,
    error: u32,
}

impl Header {
    fn no_reply(&self) -> bool {
        self.flags & HeaderFlags::NoReply as u32 != 0
    }
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct Version {
    header: Header,
    major: u16,
    minor: u16,
}

#[derive(Serialize, Deserialize, Debug)]
struct MigrationCapabilities {
    pgsize: u32,
}

const fn default_max_msg_fds() -> u32 {
    1
}

const fn default_max_data_xfer_size() -> u32 {
    1048576
}

/// The largest REGION_READ or REGION_WRITE the server accepts: the
/// `max_data_xfer_size` it advertises.
const MAX_DATA_XFER_SIZE: u32 = default_max_data_xfer_size();

/// The largest message the server accepts: a REGION_WRITE of
/// `MAX_DATA_XFER_SIZE` bytes.
const MAX_MESSAGE_SIZE: usize = size_of::<RegionAccess>() + MAX_DATA_XFER_SIZE as usize;

/// The most file descriptors the server receives with one message.
const MAX_FDS: usize = 16;

/// How long a client has, from the moment the server accepts its
/// connection, to complete the VERSION exchange unless
/// [`Server::set_handshake_timeout`] says otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[inline(always)]
fn pagesize() -> u32 {
    // SAFETY: sysconf
    unsafe { sysconf(_SC_PAGESIZE) as u32 }
}

fn default_migration_capabilities() -> MigrationCapabilities {
    MigrationCapabilities { pgsize: pagesize() }
}

bitflags! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DmaMapFlags: u32 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const READ_WRITE = Self::READ.bits() | Self::WRITE.bits();

        // There might be unknown bits and we don't want bitflags to clear them.
        const _ = !0;
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DmaUnmapFlags: u32 {
        const GET_DIRTY_PAGE_INFO = 1 << 1;
        const UNMAP_ALL = 1 << 2;

        // See above.
        const _ = !0;
    }
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct DmaMap {
    header: Header,
    argsz: u32,
    flags: u32,
    offset: u64,
    address: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct DmaUnmap {
    header: Header,
    argsz: u32,
    flags: u32,
    address: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct DeviceGetInfo {
    header: Header,
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct DeviceGetRegionInfo {
    header: Header,
    region_info: vfio_region_info,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct RegionAccess {
    header: Header,
    offset: u64,
    region: u32,
    count: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct GetIrqInfo {
    header: Header,
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct SetIrqs {
    header: Header,
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct DeviceReset {
    header: Header,
}

// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for Header {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for Version {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DmaMap {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DmaUnmap {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DeviceGetInfo {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DeviceGetRegionInfo {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for RegionAccess {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for GetIrqInfo {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for SetIrqs {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DeviceReset {}

#[derive(Serialize, Deserialize, Debug)]
struct Capabilities {
    #[serde(default = "default_max_msg_fds")]
    max_msg_fds: u32,
    #[serde(default = "default_max_data_xfer_size")]
    max_data_xfer_size: u32,
    #[serde(default = "default_migration_capabilities")]
    migration: MigrationCapabilities,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct CapabilitiesData {
    capabilities: Capabilities,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            max_msg_fds: default_max_msg_fds(),
            max_data_xfer_size: default_max_data_xfer_size(),
            migration: default_migration_capabilities(),
        }
    }
}

pub struct Client {
    stream: UnixStream,
    next_message_id: Wrapping<u16>,
    num_irqs: u32,
    resettable: bool,
    regions: Vec<Region>,
}

#[derive(Debug)]
pub struct Region {
    pub flags: u32,
    pub index: u32,
    pub size: u64,
    pub file_offset: Option<FileOffset>,
    pub sparse_areas: Vec<vfio_region_sparse_mmap_area>,
}

#[derive(Clone, Copy, Debug)]
pub struct IrqInfo {
    pub index: u32,
    pub flags: u32,
    pub count: u32,
}

#[derive(Error, Debug)]
pub enum Error {
    #[error("Error connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("Error serializing capabilities: {0}")]
    SerializeCapabilites(#[source] serde_json::Error),
    #[error("Error deserializing capabilities: {0}")]
    DeserializeCapabilites(#[source] serde_json::Error),
    #[error("Error writing to stream: {0}")]
    StreamWrite(#[source] std::io::Error),
    #[error("Error reading from stream: {0}")]
    StreamRead(#[source] std::io::Error),
    #[error("Error shutting down stream: {0}")]
    StreamShutdown(#[source] std::io::Error),
    #[error("Error writing with file descriptors: {0}")]
    SendWithFd(#[source] vmm_sys_util::errno::Error),
    #[error("Error reading with file descriptors: {0}")]
    ReceiveWithFd(#[source] vmm_sys_util::errno::Error),
    #[error("Not a PCI device")]
    NotPciDevice,
    #[error("Socket path already exists")]
    SocketPathExists,
    #[error("Error binding to socket: {0}")]
    SocketBind(#[source] std::io::Error),
    #[error("Error accepting connection: {0}")]
    SocketAccept(#[source] std::io::Error),
    #[error("Unknown command: {0}")]
    UnknownCommand(u16),
    #[error("Unsupported command: {0:?}")]
    UnsupportedCommand(Command),
    #[error("Unsupported feature")]
    UnsupportedFeature,
    #[error("Error from backend: {0:?}")]
    Backend(#[source] std::io::Error),
    #[error("Invalid input")]
    InvalidInput,
    #[error("No_reply bit unexpectedly set for command: {0:?}")]
    UnexpectedNoReply(Command),
}

/// The header every capability of a region begins with.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct CapabilityHeader {
    id: u16,
    version: u16,
    next: u32,
}

/// Fixed-size header at the start of a sparse mmap capability.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct SparseMmapHeader {
    nr_areas: u32,
    reserved: u32,
}

// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for CapabilityHeader {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for SparseMmapHeader {}

/// Error encountered while walking a region's capability list.
#[derive(Debug, Error)]
enum CapabilityError {
    #[error("offset {0} does not advance")]
    NotAdvancing(usize),
    #[error("offset {offset} is outside the {len} bytes of capability data")]
    Outside { offset: usize, len: usize },
    #[error("capability at offset {offset} is truncated")]
    Truncated {
        offset: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("sparse mmap capability at offset {offset} claims {count} areas, which do not fit")]
    AreaCount {
        offset: usize,
        count: usize,
        #[source]
        source: std::io::Error,
    },
}

impl Client {
    pub fn new(path: &Path) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).map_err(Error::Connect)?;

        let mut client = Client {
            next_message_id: Wrapping(0),
            stream,
            num_irqs: 0,
            resettable: false,
            regions: Vec::new(),
        };

        client.negotiate_version()?;

        client.regions = client.get_regions()?;

        Ok(client)
    }

    fn negotiate_version(&mut self) -> Result<(), Error> {
        let caps = CapabilitiesData::default();

        let version_data = serde_json::to_string(&caps).map_err(Error::SerializeCapabilites)?;

        let version = Version {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::Version as u16,
                flags: HeaderFlags::Command as u32,
                message_size: (size_of::<Version>() + version_data.len() + 1) as u32,
                ..Default::default()
            },
            major: 0,
            minor: 1,
        };
        debug!("Command: {version:?}");

        let version_data = CString::new(version_data.as_bytes()).unwrap();
        let bufs = vec![
            IoSlice::new(version.as_slice()),
            IoSlice::new(version_data.as_bytes_with_nul()),
        ];

        // TODO: Use write_all_vectored() when ready
        let _ = self
            .stream
            .write_vectored(&bufs)
            .map_err(Error::StreamWrite)?;

        debug!(
            "Sent client version information: major = {} minor = {} capabilities = {:?}",
            version.major, version.minor, caps.capabilities
        );

        self.next_message_id += Wrapping(1);

        let mut server_version: Version = Version::default();
        self.stream
            .read_exact(server_version.as_mut_slice())
            .map_err(Error::StreamRead)?;

        debug!("Reply: {server_version:?}");

        let mut server_version_data =
            vec![0; server_version.header.message_size as usize - size_of::<Version>()];
        self.stream
            .read_exact(server_version_data.as_mut_slice())
            .map_err(Error::StreamRead)?;

        let server_caps: CapabilitiesData =
            serde_json::from_slice(&server_version_data[0..server_version_data.len() - 1])
                .map_err(Error::DeserializeCapabilites)?;

        debug!(
            "Received server version information: major = {} minor = {} capabilities = {:?}",
            server_version.major, server_version.minor, server_caps.capabilities
        );

        Ok(())
    }

    pub fn dma_map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        fd: RawFd,
    ) -> Result<(), Error> {
        let dma_map = DmaMap {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::DmaMap as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<DmaMap>() as u32,
                ..Default::default()
            },
            argsz: (size_of::<DmaMap>() - size_of::<Header>()) as u32,
            flags: DmaMapFlags::READ_WRITE.bits(),
            offset,
            address,
            size,
        };
        debug!("Command: {dma_map:?}");
        self.next_message_id += Wrapping(1);
        self.stream
            .send_with_fd(dma_map.as_slice(), fd)
            .map_err(Error::SendWithFd)?;

        let mut reply = Header::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");

        Ok(())
    }

    pub fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), Error> {
        let dma_unmap = DmaUnmap {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::DmaUnmap as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<DmaUnmap>() as u32,
                ..Default::default()
            },
            argsz: (size_of::<DmaUnmap>() - size_of::<Header>()) as u32,
            flags: 0,
            address,
            size,
        };
        debug!("Command: {dma_unmap:?}");
        self.next_message_id += Wrapping(1);
        self.stream
            .write_all(dma_unmap.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = DmaUnmap::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");

        Ok(())
    }

    pub fn reset(&mut self) -> Result<(), Error> {
        let reset = DeviceReset {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::DeviceReset as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<DeviceReset>() as u32,
                ..Default::default()
            },
        };
        debug!("Command: {reset:?}");
        self.next_message_id += Wrapping(1);
        self.stream
            .write_all(reset.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = Header::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");

        Ok(())
    }

    fn get_regions(&mut self) -> Result<Vec<Region>, Error> {
        let get_info = DeviceGetInfo {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::DeviceGetInfo as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<DeviceGetInfo>() as u32,
                ..Default::default()
            },
            argsz: size_of::<DeviceGetInfo>() as u32,
            ..Default::default()
        };
        debug!("Command: {get_info:?}");
        self.next_message_id += Wrapping(1);

        self.stream
            .write_all(get_info.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = DeviceGetInfo::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");
        self.num_irqs = reply.num_irqs;

        if reply.flags & VFIO_DEVICE_FLAGS_PCI != VFIO_DEVICE_FLAGS_PCI {
            return Err(Error::NotPciDevice);
        }

        self.resettable = reply.flags & VFIO_DEVICE_FLAGS_RESET != VFIO_DEVICE_FLAGS_RESET;

        let num_regions = reply.num_regions;
        let mut regions = Vec::new();
        for index in 0..num_regions {
            let (region_info, fd, sparse_areas) = self.get_region_info(index)?;
            regions.push(Region {
                flags: region_info.flags,
                index: region_info.index,
                size: region_info.size,
                file_offset: fd.map(|fd| FileOffset::new(fd, region_info.offset)),
                sparse_areas,
            });
        }

        Ok(regions)
    }

    fn get_region_info(
        &mut self,
        index: u32,
    ) -> Result<
        (
            vfio_region_info,
            Option<File>,
            Vec<vfio_region_sparse_mmap_area>,
        ),
        Error,
    > {
        // Retrieve the region info without capability
        let mut get_region_info = DeviceGetRegionInfo {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::DeviceGetRegionInfo as u16,
                flags: HeaderFlags::Command as u32,
                message_size: std::mem::size_of::<DeviceGetRegionInfo>() as u32,
                ..Default::default()
            },
            region_info: vfio_region_info {
                argsz: size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            },
        };
        debug!("Command: {get_region_info:?}");
        self.next_message_id += Wrapping(1);

        self.stream
            .write_all(get_region_info.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = DeviceGetRegionInfo::default();
        let (_, fd) = self
            .stream
            .recv_with_fd(reply.as_mut_slice())
            .map_err(Error::ReceiveWithFd)?;
        debug!("Reply: {reply:?}");

        // Retrieve the region info again with capabilities if needed
        if reply.region_info.argsz > std::mem::size_of::<vfio_region_info>() as u32 {
            get_region_info.region_info.argsz = reply.region_info.argsz;
            debug!("Command: {get_region_info:?}");
            self.next_message_id += Wrapping(1);

            self.stream
                .write_all(get_region_info.as_slice())
                .map_err(Error::StreamWrite)?;

            let mut reply = DeviceGetRegionInfo::default();
            let (_, fd) = self
                .stream
                .recv_with_fd(reply.as_mut_slice())
                .map_err(Error::ReceiveWithFd)?;
            debug!("Reply: {reply:?}");

            let cap_size = reply.region_info.argsz - std::mem::size_of::<vfio_region_info>() as u32;
            assert_eq!(
                cap_size,
                reply.header.message_size - size_of::<DeviceGetRegionInfo>() as u32
            );
            let mut cap_data = vec![0; cap_size as usize];
            self.stream
                .read_exact(cap_data.as_mut_slice())
                .map_err(Error::StreamRead)?;

            let sparse_areas = Self::parse_region_caps(&cap_data, &reply.region_info)
                .inspect_err(|error| warn!("Region {index}: {error}"))
                .map_err(|_| Error::InvalidInput)?;

            Ok((reply.region_info, fd, sparse_areas))
        } else {
            Ok((reply.region_info, fd, Vec::new()))
        }
    }

    /// Collects the mmap-able areas of every sparse mmap capability in the
    /// list that follows `vfio_region_info` in a `DEVICE_GET_REGION_INFO`
    /// reply.
    ///
    /// Offsets in the list are relative to the start of the
    /// `vfio_region_info` structure, which `cap_data` does not include.
    fn parse_region_caps(
        cap_data: &[u8],
        region_info: &vfio_region_info,
    ) -> Result<Vec<vfio_region_sparse_mmap_area>, CapabilityError> {
        let mut sparse_areas = Vec::new();
        let mut next = region_info.cap_offset as usize;
        let mut previous = 0;

        while next != 0 {
            let offset = next;
            if next <= previous {
                return Err(CapabilityError::NotAdvancing(offset));
            }
            previous = next;

            let mut capability = next
                .checked_sub(size_of::<vfio_region_info>())
                .and_then(|from| cap_data.get(from..))
                .ok_or(CapabilityError::Outside {
                    offset,
                    len: cap_data.len(),
                })?;

            let header = CapabilityHeader::read_exact_from(&mut capability)
                .map_err(|source| CapabilityError::Truncated { offset, source })?;
            next = header.next as usize;

            if u32::from(header.id) != VFIO_REGION_INFO_CAP_SPARSE_MMAP {
                warn!(
                    "Ignoring unsupported vfio region capability (id = '{}')",
                    header.id
                );
                continue;
            }

            let sparse = SparseMmapHeader::read_exact_from(&mut capability)
                .map_err(|source| CapabilityError::Truncated { offset, source })?;
            let count = sparse.nr_areas as usize;

            for _ in 0..count {
                sparse_areas.push(vfio_region_sparse_mmap_area {
                    offset: u64::read_exact_from(&mut capability).map_err(|source| {
                        CapabilityError::AreaCount {
                            offset,
                            count,
                            source,
                        }
                    })?,
                    size: u64::read_exact_from(&mut capability).map_err(|source| {
                        CapabilityError::AreaCount {
                            offset,
                            count,
                            source,
                        }
                    })?,
                });
            }
        }

        Ok(sparse_areas)
    }

    pub fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let region_read = RegionAccess {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::RegionRead as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<RegionAccess>() as u32,
                ..Default::default()
            },
            offset,
            count: data.len() as u32,
            region,
        };
        debug!("Command: {region_read:?}");
        self.next_message_id += Wrapping(1);
        self.stream
            .write_all(region_read.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = RegionAccess::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");
        self.stream.read_exact(data).map_err(Error::StreamRead)?;
        Ok(())
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let region_write = RegionAccess {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::RegionWrite as u16,
                flags: HeaderFlags::Command as u32,
                message_size: (size_of::<RegionAccess>() + data.len()) as u32,
                ..Default::default()
            },
            offset,
            count: data.len() as u32,
            region,
        };
        debug!("Command: {region_write:?}");
        self.next_message_id += Wrapping(1);

        let bufs = vec![IoSlice::new(region_write.as_slice()), IoSlice::new(data)];

        // TODO: Use write_all_vectored() when ready
        let _ = self
            .stream
            .write_vectored(&bufs)
            .map_err(Error::StreamWrite)?;

        let mut reply = RegionAccess::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");
        Ok(())
    }

    pub fn get_irq_info(&mut self, index: u32) -> Result<IrqInfo, Error> {
        let get_irq_info = GetIrqInfo {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::GetIrqInfo as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<GetIrqInfo>() as u32,
                ..Default::default()
            },
            argsz: (size_of::<GetIrqInfo>() - size_of::<Header>()) as u32,
            flags: 0,
            index,
            count: 0,
        };
        debug!("Command: {get_irq_info:?}");
        self.next_message_id += Wrapping(1);

        self.stream
            .write_all(get_irq_info.as_slice())
            .map_err(Error::StreamWrite)?;

        let mut reply = GetIrqInfo::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");

        Ok(IrqInfo {
            index: reply.index,
            flags: reply.flags,
            count: reply.count,
        })
    }

    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), Error> {
        let set_irqs = SetIrqs {
            header: Header {
                message_id: self.next_message_id.0,
                command: Command::SetIrqs as u16,
                flags: HeaderFlags::Command as u32,
                message_size: size_of::<SetIrqs>() as u32,
                ..Default::default()
            },
            argsz: (size_of::<SetIrqs>() - size_of::<Header>()) as u32,
            flags,
            start,
            index,
            count,
        };
        debug!("Command: {set_irqs:?}");
        self.next_message_id += Wrapping(1);

        self.stream
            .send_with_fds(&[set_irqs.as_slice()], fds)
            .map_err(Error::SendWithFd)?;

        let mut reply = Header::default();
        self.stream
            .read_exact(reply.as_mut_slice())
            .map_err(Error::StreamRead)?;
        debug!("Reply: {reply:?}");

        Ok(())
    }

    pub fn region(&self, region_index: u32) -> Option<&Region> {
        self.regions
            .iter()
            .find(|&region| region.index == region_index)
    }

    pub fn resettable(&self) -> bool {
        self.resettable
    }

    pub fn shutdown(&self) -> Result<(), Error> {
        self.stream
            .shutdown(std::net::Shutdown::Both)
            .map_err(Error::StreamShutdown)
    }
}

pub trait ServerBackend {
    fn region_read(
        &mut self,
        _region: u32,
        _offset: u64,
        _data: &mut [u8],
    ) -> Result<(), std::io::Error>;
    fn region_write(
        &mut self,
        _region: u32,
        _offset: u64,
        _data: &[u8],
    ) -> Result<(), std::io::Error>;
    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        _offset: u64,
        _address: u64,
        _size: u64,
        _fd: Option<File>,
    ) -> Result<(), std::io::Error>;
    fn dma_unmap(
        &mut self,
        _flags: DmaUnmapFlags,
        _address: u64,
        _size: u64,
    ) -> Result<(), std::io::Error>;
    fn reset(&mut self) -> Result<(), std::io::Error>;
    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        _fds: Vec<File>,
    ) -> Result<(), std::io::Error>;
}

#[derive(Clone, Copy)]
pub struct SparseArea {
    pub area: vfio_region_sparse_mmap_area,
}

#[derive(Clone)]
pub struct ServerRegion {
    pub region_info: vfio_region_info,
    pub sparse_areas: Vec<SparseArea>,
    pub mmap_fd: Option<RawFd>,
}

pub struct Server {
    listener: UnixListener,
    path: Option<PathBuf>,
    resettable: bool,
    irqs: Vec<IrqInfo>,
    regions: Vec<ServerRegion>,
    handshake_timeout: Option<Duration>,
}

impl Server {
    pub fn new(
        path: &Path,
        resettable: bool,
        irqs: Vec<IrqInfo>,
        regions: Vec<ServerRegion>,
    ) -> Result<Server, Error> {
        if path.exists() {
            return Err(Error::SocketPathExists);
        }

        let listener = UnixListener::bind(path).map_err(Error::SocketBind)?;

        Ok(Server {
            listener,
            path: Some(path.to_path_buf()),
            resettable,
            irqs,
            regions,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        })
    }

    pub fn from_owned_fd(
        fd: OwnedFd,
        resettable: bool,
        irqs: Vec<IrqInfo>,
        regions: Vec<ServerRegion>,
    ) -> Server {
        let listener = UnixListener::from(fd);

        Server {
            listener,
            path: None,
            resettable,
            irqs,
            regions,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        }
    }

    /// Sets how long a client has, from the moment [`Server::run`] accepts
    /// its connection, to complete the VERSION exchange, the first message
    /// of the protocol: [`DEFAULT_HANDSHAKE_TIMEOUT`] unless set. `None`
    /// waits for ever.
    ///
    /// A client that connects and then sends nothing, or part of a
    /// message, would otherwise hold the server, which serves one client
    /// at a time, for as long as it likes. Once the VERSION exchange is
    /// done the connection has no timeout: a VMM may leave its device
    /// alone for hours.
    pub fn set_handshake_timeout(&mut self, timeout: Option<Duration>) {
        self.handshake_timeout = timeout;
    }

    fn handle_command(
        &self,
        backend: &mut dyn ServerBackend,
        stream: &mut Connection,
        header: Header,
        body: &[u8],
        fds: Vec<File>,
    ) -> Result<(), Error> {
        let command = Command::n(header.command).ok_or(Error::UnknownCommand(header.command))?;
        // Only DMA_MAP and SET_IRQS carry file descriptors.
        if !fds.is_empty() && !matches!(command, Command::DmaMap | Command::SetIrqs) {
            return Err(invalid_input(format_args!(
                "{command:?} carries {} file descriptors",
                fds.len()
            )));
        }
        match command {
            Command::Unknown
            | Command::GetRegionIoFds
            | Command::DmaRead
            | Command::DmaWrite
            | Command::UserDirtyPages => {
                return Err(Error::UnsupportedCommand(command));
            }
            Command::Version => {
                if header.no_reply() {
                    return Err(Error::UnexpectedNoReply(Command::Version));
                }

                // TODO: Make version/capabilities configurable
                let (client_version, version_data) = parse_command::<Version>(header, body)?;
                // The capabilities are an optional NUL-terminated JSON string.
                let client_capabilities: CapabilitiesData = match version_data.split_last() {
                    None => CapabilitiesData::default(),
                    Some((0, json)) => {
                        serde_json::from_slice(json).map_err(Error::DeserializeCapabilites)?
                    }
                    Some(_) => {
                        return Err(invalid_input(format_args!(
                            "version data of {} bytes is not NUL-terminated",
                            version_data.len()
                        )))
                    }
                };

                info!(
                    "Received client version: major = {} minor = {} capabilities = {:?}",
                    client_version.major, client_version.minor, client_capabilities.capabilities,
                );

                let server_capabilities = CapabilitiesData::default();
                let mut server_version_data = serde_json::to_vec(&server_capabilities)
                    .map_err(Error::SerializeCapabilites)?;
                server_version_data.push(0);
                let server_version = Version {
                    header: Header {
                        message_id: client_version.header.message_id,
                        command: Command::Version as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: (size_of::<Version>() + server_version_data.len()) as u32,
                        ..Default::default()
                    },
                    major: 0,
                    minor: 0,
                };

                let mut reply = server_version.as_slice().to_vec();
                reply.extend_from_slice(&server_version_data);
                stream.write_all(&reply).map_err(Error::StreamWrite)?;

                info!(
                    "Sent server version: major = {} minor = {} capabilities = {:?}",
                    server_version.major, server_version.minor, server_capabilities.capabilities
                );
            }
            Command::DmaMap => {
                let (cmd, _) = parse_command::<DmaMap>(header, body)?;
                check_argsz::<DmaMap>(command, cmd.argsz)?;

                let mut fds = fds;

                // The specification demands that the caller passes 0
                // or 1 file descriptor.
                if fds.len() > 1 {
                    return Err(invalid_input(format_args!(
                        "DmaMap carries {} file descriptors",
                        fds.len()
                    )));
                }

                backend
                    .dma_map(
                        DmaMapFlags::from_bits_truncate(cmd.flags),
                        cmd.offset,
                        cmd.address,
                        cmd.size,
                        fds.pop(),
                    )
                    .map_err(Error::Backend)?;

                if header.no_reply() {
                    return Ok(());
                }

                let reply = Header {
                    message_id: cmd.header.message_id,
                    command: Command::DmaMap as u16,
                    flags: HeaderFlags::Reply as u32,
                    message_size: size_of::<Header>() as u32,
                    ..Default::default()
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::DmaUnmap => {
                let (cmd, _) = parse_command::<DmaUnmap>(header, body)?;
                check_argsz::<DmaUnmap>(command, cmd.argsz)?;

                backend
                    .dma_unmap(
                        DmaUnmapFlags::from_bits_truncate(cmd.flags),
                        cmd.address,
                        cmd.size,
                    )
                    .map_err(Error::Backend)?;

                if header.no_reply() {
                    return Ok(());
                }

                let reply = DmaUnmap {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::DmaUnmap as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: size_of::<DmaUnmap>() as u32,
                        ..Default::default()
                    },
                    argsz: cmd.argsz,
                    flags: cmd.flags,
                    address: cmd.address,
                    size: cmd.size,
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::DeviceGetInfo => {
                if header.no_reply() {
                    return Err(Error::UnexpectedNoReply(Command::DeviceGetInfo));
                }

                let (cmd, _) = parse_command::<DeviceGetInfo>(header, body)?;
                check_argsz::<DeviceGetInfo>(command, cmd.argsz)?;

                let reply = DeviceGetInfo {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::DeviceGetInfo as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: size_of::<DeviceGetInfo>() as u32,
                        ..Default::default()
                    },
                    argsz: size_of::<DeviceGetInfo>() as u32 - size_of::<Header>() as u32,
                    // TODO: Consider non-PCI devices
                    flags: VFIO_DEVICE_FLAGS_PCI
                        | if self.resettable {
                            VFIO_DEVICE_FLAGS_RESET
                        } else {
                            0
                        },
                    num_regions: self.regions.len() as u32,
                    num_irqs: self.irqs.len() as u32,
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::DeviceGetRegionInfo => {
                if header.no_reply() {
                    return Err(Error::UnexpectedNoReply(Command::DeviceGetRegionInfo));
                }

                let (cmd, _) = parse_command::<DeviceGetRegionInfo>(header, body)?;
                check_argsz::<DeviceGetRegionInfo>(command, cmd.region_info.argsz)?;

                let server_region = self
                    .regions
                    .get(cmd.region_info.index as usize)
                    .ok_or_else(|| {
                        invalid_input(format_args!("no region {}", cmd.region_info.index))
                    })?;
                let mut region_info = server_region.region_info;
                let sparse_areas = &server_region.sparse_areas;

                let mut cap_data: Vec<u8> = Vec::new();
                if !sparse_areas.is_empty() {
                    // The structures the client reads the list back through,
                    // in the order it reads them.
                    let header = CapabilityHeader {
                        id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                        version: 1,
                        next: 0,
                    };
                    cap_data.extend_from_slice(header.as_slice());

                    let sparse = SparseMmapHeader {
                        nr_areas: sparse_areas.len() as u32,
                        reserved: 0,
                    };
                    cap_data.extend_from_slice(sparse.as_slice());

                    for sparse_area in sparse_areas {
                        cap_data.extend_from_slice(sparse_area.area.offset.as_slice());
                        cap_data.extend_from_slice(sparse_area.area.size.as_slice());
                    }
                }

                let send_cap_data = if !cap_data.is_empty() {
                    let full_argsz = (size_of::<vfio_region_info>() + cap_data.len()) as u32;
                    region_info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
                    region_info.argsz = full_argsz;
                    region_info.cap_offset = size_of::<vfio_region_info>() as u32;
                    cmd.region_info.argsz >= full_argsz
                } else {
                    false
                };

                let message_size = if send_cap_data {
                    (size_of::<DeviceGetRegionInfo>() + cap_data.len()) as u32
                } else {
                    size_of::<DeviceGetRegionInfo>() as u32
                };

                let reply = DeviceGetRegionInfo {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::DeviceGetRegionInfo as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size,
                        ..Default::default()
                    },
                    region_info,
                };

                if send_cap_data {
                    let reply_bytes = reply.as_slice();
                    let mut buf = Vec::with_capacity(reply_bytes.len() + cap_data.len());
                    buf.extend_from_slice(reply_bytes);
                    buf.extend_from_slice(&cap_data);

                    if let Some(fd) = server_region.mmap_fd {
                        stream.send_with_fd(&buf, fd)?;
                    } else {
                        stream.write_all(&buf).map_err(Error::StreamWrite)?;
                    }
                } else {
                    stream
                        .write_all(reply.as_slice())
                        .map_err(Error::StreamWrite)?;
                }
            }
            Command::GetIrqInfo => {
                if header.no_reply() {
                    return Err(Error::UnexpectedNoReply(Command::GetIrqInfo));
                }

                let (cmd, _) = parse_command::<GetIrqInfo>(header, body)?;
                check_argsz::<GetIrqInfo>(command, cmd.argsz)?;

                let irq = self
                    .irqs
                    .get(cmd.index as usize)
                    .ok_or_else(|| invalid_input(format_args!("no irq index {}", cmd.index)))?;

                let reply = GetIrqInfo {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::GetIrqInfo as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: size_of::<GetIrqInfo>() as u32,
                        ..Default::default()
                    },
                    argsz: (size_of::<GetIrqInfo>() - size_of::<Header>()) as u32,
                    index: irq.index,
                    flags: irq.flags,
                    count: irq.count,
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::SetIrqs => {
                let (cmd, _) = parse_command::<SetIrqs>(header, body)?;
                check_argsz::<SetIrqs>(command, cmd.argsz)?;

                let irq = self
                    .irqs
                    .get(cmd.index as usize)
                    .ok_or_else(|| invalid_input(format_args!("no irq index {}", cmd.index)))?;

                if cmd.flags & VFIO_IRQ_SET_DATA_BOOL > 0 {
                    return Err(Error::UnsupportedFeature);
                }

                // A count of 0 addresses the whole index (e.g. to disable it).
                if cmd.count > 0
                    && !matches!(cmd.start.checked_add(cmd.count), Some(end) if end <= irq.count)
                {
                    return Err(invalid_input(format_args!(
                        "irqs {} + {} outside the {} of index {}",
                        cmd.start, cmd.count, irq.count, cmd.index
                    )));
                }

                // One file descriptor per interrupt at most: an interrupt
                // without one (-1 in VFIO) is sent without one.
                let max_fds = if cmd.flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
                    cmd.count as usize
                } else {
                    0
                };
                if fds.len() > max_fds {
                    return Err(invalid_input(format_args!(
                        "SetIrqs for {} irqs (flags {:#x}) carries {} file descriptors",
                        cmd.count,
                        cmd.flags,
                        fds.len()
                    )));
                }

                backend
                    .set_irqs(cmd.index, cmd.flags, cmd.start, cmd.count, fds)
                    .map_err(Error::Backend)?;

                if header.no_reply() {
                    return Ok(());
                }

                let reply = Header {
                    message_id: cmd.header.message_id,
                    command: Command::SetIrqs as u16,
                    flags: HeaderFlags::Reply as u32,
                    message_size: size_of::<Header>() as u32,
                    ..Default::default()
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::RegionRead => {
                if header.no_reply() {
                    return Err(Error::UnexpectedNoReply(Command::RegionRead));
                }

                let (cmd, _) = parse_command::<RegionAccess>(header, body)?;
                let (region, offset, count) = (cmd.region, cmd.offset, cmd.count);
                self.check_region_access(region, offset, count)?;

                // Bounded by check_region_access().
                let mut data = vec![0u8; count as usize];
                backend
                    .region_read(region, offset, &mut data)
                    .map_err(Error::Backend)?;

                let reply = RegionAccess {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::RegionRead as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: size_of::<RegionAccess>() as u32 + count,
                        ..Default::default()
                    },
                    region,
                    offset,
                    count,
                };
                let mut buf = Vec::with_capacity(size_of::<RegionAccess>() + data.len());
                buf.extend_from_slice(reply.as_slice());
                buf.extend_from_slice(&data);
                stream.write_all(&buf).map_err(Error::StreamWrite)?;
            }
            Command::RegionWrite => {
                let (cmd, data) = parse_command::<RegionAccess>(header, body)?;
                let (region, offset, count) = (cmd.region, cmd.offset, cmd.count);
                self.check_region_access(region, offset, count)?;

                if data.len() != count as usize {
                    return Err(invalid_input(format_args!(
                        "RegionWrite of {count} bytes carries {} bytes",
                        data.len()
                    )));
                }

                backend
                    .region_write(region, offset, data)
                    .map_err(Error::Backend)?;

                if header.no_reply() {
                    return Ok(());
                }

                let reply = RegionAccess {
                    header: Header {
                        message_id: cmd.header.message_id,
                        command: Command::RegionWrite as u16,
                        flags: HeaderFlags::Reply as u32,
                        message_size: size_of::<RegionAccess>() as u32,
                        ..Default::default()
                    },
                    region,
                    offset,
                    count,
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
            Command::DeviceReset => {
                backend.reset().map_err(Error::Backend)?;

                if header.no_reply() {
                    return Ok(());
                }

                let reply = Header {
                    message_id: header.message_id,
                    command: Command::DeviceReset as u16,
                    flags: HeaderFlags::Reply as u32,
                    message_size: size_of::<Header>() as u32,
                    ..Default::default()
                };
                stream
                    .write_all(reply.as_slice())
                    .map_err(Error::StreamWrite)?;
            }
        }

        Ok(())
    }

    /// Checks a REGION_READ or REGION_WRITE against the region table and
    /// the transfer size the server advertises.
    fn check_region_access(&self, region: u32, offset: u64, count: u32) -> Result<(), Error> {
        if region as usize >= self.regions.len() {
            return Err(invalid_input(format_args!("no region {region}")));
        }
        if count > MAX_DATA_XFER_SIZE {
            return Err(invalid_input(format_args!(
                "access of {count} bytes exceeds max_data_xfer_size ({MAX_DATA_XFER_SIZE})"
            )));
        }
        if offset.checked_add(u64::from(count)).is_none() {
            return Err(invalid_input(format_args!(
                "access of {count} bytes at {offset:#x} wraps around"
            )));
        }
        Ok(())
    }

    /// Serves one client: accepts a connection and handles its commands
    /// until it disconnects.
    ///
    /// Returns `Ok` when the client closes the connection between two
    /// messages. A malformed command gets an error reply and the
    /// connection goes on; a message that cannot be framed (a size
    /// smaller than its header or larger than the server accepts, a
    /// message cut short), a failing socket, or a client that has not
    /// completed the VERSION exchange within the handshake timeout (see
    /// [`Server::set_handshake_timeout`]) ends the connection with an
    /// `Err`. Either way the server can `run` again for the next client.
    /// Commands before a successful VERSION are refused.
    pub fn run(&self, backend: &mut dyn ServerBackend) -> Result<(), Error> {
        let (stream, _) = self.listener.accept().map_err(Error::SocketAccept)?;
        let mut stream = Connection::new(stream, self.handshake_timeout);
        let result = self.serve(backend, &mut stream);
        if result.is_err() && stream.deadline.is_some_and(|d| Instant::now() >= d) {
            warn!(
                "Client did not complete the VERSION exchange within {:?}",
                self.handshake_timeout.unwrap_or_default()
            );
        }
        result
    }

    fn serve(&self, backend: &mut dyn ServerBackend, stream: &mut Connection) -> Result<(), Error> {
        loop {
            let Some((header, fds)) = stream.receive_header()? else {
                info!("Connection closed");
                break;
            };

            let size = header.message_size as usize;
            if !(size_of::<Header>()..=MAX_MESSAGE_SIZE).contains(&size) {
                error!(
                    "Message {} (command {}) claims {size} bytes, outside {}..={MAX_MESSAGE_SIZE}: closing the connection",
                    header.message_id,
                    header.command,
                    size_of::<Header>()
                );
                // Best effort: the stream cannot be resynchronised.
                let _ = stream.write_all(error_reply(&header, EINVAL).as_slice());
                return Err(Error::InvalidInput);
            }
            let mut body = vec![0u8; size - size_of::<Header>()];
            stream.read_exact(&mut body).map_err(Error::StreamRead)?;

            let result = if !stream.handshake_done && header.command != Command::Version as u16 {
                Err(invalid_input(format_args!(
                    "command {} before the VERSION exchange",
                    header.command
                )))
            } else {
                self.handle_command(backend, stream, header, &body, fds)
            };
            match result {
                Ok(()) => {
                    if header.command == Command::Version as u16 {
                        stream.handshake_done().map_err(Error::StreamRead)?;
                    }
                }
                // The connection is broken, an error reply would not get through.
                Err(e @ (Error::StreamWrite(_) | Error::SendWithFd(_))) => return Err(e),
                Err(e) => {
                    error!("Error handling command: {:?}: {e}", header.command);
                    stream
                        .write_all(error_reply(&header, errno(&e)).as_slice())
                        .map_err(Error::StreamWrite)?;
                }
            }
        }

        Ok(())
    }
}

/// The error reply to the command in `header`.
fn error_reply(header: &Header, errno: i32) -> Header {
    Header {
        message_id: header.message_id,
        command: header.command,
        flags: HeaderFlags::Error as u32 | HeaderFlags::Reply as u32,
        message_size: size_of::<Header>() as u32,
        error: errno as u32,
    }
}

/// The errno an error reply carries for `error`: never 0, which a client
/// could take for success.
fn errno(error: &Error) -> i32 {
    match error {
        Error::UnknownCommand(_) | Error::UnsupportedCommand(_) | Error::UnsupportedFeature => {
            ENOTSUP
        }
        Error::Backend(e) => match e.raw_os_error() {
            Some(errno) if errno > 0 => errno,
            _ if e.kind() == ErrorKind::InvalidInput => EINVAL,
            _ => EIO,
        },
        Error::InvalidInput
        | Error::DeserializeCapabilites(_)
        | Error::UnexpectedNoReply(_)
        | Error::NotPciDevice => EINVAL,
        _ => EIO,
    }
}

/// Logs why a command is rejected, returning the error it gets.
fn invalid_input(why: std::fmt::Arguments) -> Error {
    warn!("Invalid command: {why}");
    Error::InvalidInput
}

/// Splits a command structure `T` (a `Header` followed by the fixed part of
/// the command) off the body of a message, returning it and the bytes that
/// follow it.
fn parse_command<T: ByteValued + Default>(
    header: Header,
    body: &[u8],
) -> Result<(T, &[u8]), Error> {
    let (fixed, rest) = body
        .split_at_checked(size_of::<T>() - size_of::<Header>())
        .ok_or_else(|| {
            invalid_input(format_args!(
                "command {} of {} bytes is shorter than its {} bytes",
                header.command,
                header.message_size,
                size_of::<T>()
            ))
        })?;
    let mut cmd = T::default();
    let (cmd_header, cmd_fixed) = cmd.as_mut_slice().split_at_mut(size_of::<Header>());
    cmd_header.copy_from_slice(header.as_slice());
    cmd_fixed.copy_from_slice(fixed);
    Ok((cmd, rest))
}

/// Checks that the `argsz` of a command `T` covers its fixed part.
fn check_argsz<T>(command: Command, argsz: u32) -> Result<(), Error> {
    let min = size_of::<T>() - size_of::<Header>();
    if (argsz as usize) < min {
        return Err(invalid_input(format_args!(
            "{command:?} argsz {argsz} is below {min}"
        )));
    }
    Ok(())
}

/// The server's end of a client connection.
struct Connection {
    stream: UnixStream,
    /// When the VERSION exchange must be over; `None` once it is, or if it
    /// may take for ever.
    deadline: Option<Instant>,
    /// Whether the VERSION exchange is over.
    handshake_done: bool,
}

impl Connection {
    fn new(stream: UnixStream, handshake_timeout: Option<Duration>) -> Self {
        Connection {
            stream,
            deadline: handshake_timeout.map(|timeout| Instant::now() + timeout),
            handshake_done: false,
        }
    }

    /// Bounds the next socket operation by what is left of the handshake
    /// deadline, so that trickling bytes cannot extend it.
    fn arm(&self) -> std::io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(handshake_timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))
    }

    /// The VERSION exchange succeeded: from now on the client may take as
    /// long as it likes.
    fn handshake_done(&mut self) -> std::io::Result<()> {
        self.handshake_done = true;
        if self.deadline.take().is_some() {
            self.stream.set_read_timeout(None)?;
            self.stream.set_write_timeout(None)?;
        }
        Ok(())
    }

    /// Turns a socket timeout during the handshake into `TimedOut`.
    fn timed_out(&self, e: std::io::Error) -> std::io::Error {
        if self.deadline.is_some() && e.kind() == ErrorKind::WouldBlock {
            handshake_timed_out()
        } else {
            e
        }
    }

    /// Receives the header of the next message and the file descriptors
    /// sent with it; `None` if the client closed the connection before it.
    fn receive_header(&mut self) -> Result<Option<(Header, Vec<File>)>, Error> {
        let mut header = Header::default();
        let mut fds = [0; MAX_FDS];
        let (bytes, fds_received) = loop {
            let mut iovecs = [iovec {
                iov_base: header.as_mut_slice().as_mut_ptr() as *mut c_void,
                iov_len: header.as_mut_slice().len(),
            }];
            self.arm().map_err(Error::StreamRead)?;
            // SAFETY: the iovec covers exactly `header`, which outlives the
            // call, and `fds` has room for MAX_FDS descriptors.
            match unsafe { self.stream.recv_with_fds(&mut iovecs, &mut fds) } {
                Err(e) if e.errno() == libc::EINTR => continue,
                result => break result.map_err(Error::ReceiveWithFd)?,
            }
        };

        let fds: Vec<File> = fds[..fds_received]
            .iter()
            // SAFETY: recv_with_fds() returned these descriptors, which
            // nothing else owns.
            .map(|fd| unsafe { File::from_raw_fd(*fd) })
            .collect();

        if bytes == 0 {
            return Ok(None);
        }
        // A stream socket may deliver the header in pieces.
        if bytes < size_of::<Header>() {
            self.read_exact(&mut header.as_mut_slice()[bytes..])
                .map_err(Error::StreamRead)?;
        }
        Ok(Some((header, fds)))
    }

    fn send_with_fd(&mut self, buf: &[u8], fd: RawFd) -> Result<(), Error> {
        self.arm().map_err(Error::StreamWrite)?;
        let sent = self
            .stream
            .send_with_fd(buf, fd)
            .map_err(Error::SendWithFd)?;
        // The descriptor went with the first byte, the rest may follow.
        self.write_all(&buf[sent..]).map_err(Error::StreamWrite)
    }
}

fn handshake_timed_out() -> std::io::Error {
    std::io::Error::new(ErrorKind::TimedOut, "VERSION exchange timed out")
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        (&self.stream).read(buf).map_err(|e| self.timed_out(e))
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        (&self.stream).write(buf).map_err(|e| self.timed_out(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            if path.exists() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod capability {
        use super::*;

        /// Offsets in a capability list are relative to the region info
        /// structure.
        const FIRST_CAPABILITY: u32 = size_of::<vfio_region_info>() as u32;

        fn sparse_cap(next: u32, nr_areas: u32, areas: &[(u64, u64)]) -> Vec<u8> {
            let header = CapabilityHeader {
                id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                version: 1,
                next,
            };
            let sparse = SparseMmapHeader {
                nr_areas,
                reserved: 0,
            };

            let mut data = Vec::new();
            data.extend_from_slice(header.as_slice());
            data.extend_from_slice(sparse.as_slice());
            for (offset, size) in areas {
                data.extend_from_slice(offset.as_slice());
                data.extend_from_slice(size.as_slice());
            }
            data
        }

        fn area(offset: u64, size: u64) -> vfio_region_sparse_mmap_area {
            vfio_region_sparse_mmap_area { offset, size }
        }

        fn walk(
            cap_offset: u32,
            cap_data: &[u8],
        ) -> Result<Vec<vfio_region_sparse_mmap_area>, CapabilityError> {
            let region_info = vfio_region_info {
                argsz: (size_of::<vfio_region_info>() + cap_data.len()) as u32,
                flags: VFIO_REGION_INFO_FLAG_CAPS,
                cap_offset,
                ..Default::default()
            };
            Client::parse_region_caps(cap_data, &region_info)
        }

        #[test]
        fn absent_list_collects_none() {
            assert_eq!(walk(0, &[]).ok(), Some(vec![]));
        }

        #[test]
        fn unsupported_id_is_skipped() {
            let mut cap_data = sparse_cap(0, 1, &[(0x0, 0x1000)]);
            cap_data[0..2].copy_from_slice(&0xffffu16.to_ne_bytes());

            assert_eq!(walk(FIRST_CAPABILITY, &cap_data).ok(), Some(vec![]));
        }

        #[test]
        fn offset_inside_region_info_fails() {
            let cap_data = sparse_cap(0, 1, &[(0x0, 0x1000)]);

            assert!(matches!(
                walk(FIRST_CAPABILITY - 4, &cap_data),
                Err(CapabilityError::Outside { .. })
            ));
        }

        #[test]
        fn offset_past_list_fails() {
            let cap_data = sparse_cap(0, 1, &[(0x0, 0x1000)]);
            let past = FIRST_CAPABILITY + cap_data.len() as u32;

            assert!(matches!(
                walk(past, &cap_data),
                Err(CapabilityError::Truncated { .. })
            ));
        }

        #[test]
        fn next_pointing_at_itself_fails() {
            let cap_data = sparse_cap(FIRST_CAPABILITY, 1, &[(0x0, 0x1000)]);

            assert!(matches!(
                walk(FIRST_CAPABILITY, &cap_data),
                Err(CapabilityError::NotAdvancing(_))
            ));
        }

        mod sparse {
            use super::*;

            #[test]
            fn areas_keep_wire_order() {
                let cap_data = sparse_cap(0, 2, &[(0x0, 0x1000), (0x2000, 0x3000)]);

                assert_eq!(
                    walk(FIRST_CAPABILITY, &cap_data).ok(),
                    Some(vec![area(0x0, 0x1000), area(0x2000, 0x3000)])
                );
            }

            #[test]
            fn count_of_zero_collects_none() {
                let cap_data = sparse_cap(0, 0, &[]);

                assert_eq!(walk(FIRST_CAPABILITY, &cap_data).ok(), Some(vec![]));
            }

            #[test]
            fn count_beyond_list_fails() {
                let cap_data = sparse_cap(0, u32::MAX, &[(0x0, 0x1000)]);

                assert!(matches!(
                    walk(FIRST_CAPABILITY, &cap_data),
                    Err(CapabilityError::AreaCount { .. })
                ));
            }

            #[test]
            fn truncated_areas_fail() {
                let cap_data = sparse_cap(0, 2, &[(0x0, 0x1000)]);

                assert!(matches!(
                    walk(FIRST_CAPABILITY, &cap_data),
                    Err(CapabilityError::AreaCount { .. })
                ));
            }
        }
    }

    /// The server against a raw client that sends whatever bytes it likes.
    mod server {
        use super::*;
        use std::os::fd::AsRawFd;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::thread::JoinHandle;

        const REGION_SIZE: u64 = 0x1000;

        /// Answers reads with 0xab and records writes.
        struct Backend {
            writes: Vec<(u32, u64, Vec<u8>)>,
        }

        impl ServerBackend for Backend {
            fn region_read(
                &mut self,
                _region: u32,
                _offset: u64,
                data: &mut [u8],
            ) -> Result<(), std::io::Error> {
                data.fill(0xab);
                Ok(())
            }
            fn region_write(
                &mut self,
                region: u32,
                offset: u64,
                data: &[u8],
            ) -> Result<(), std::io::Error> {
                self.writes.push((region, offset, data.to_vec()));
                Ok(())
            }
            fn dma_map(
                &mut self,
                _flags: DmaMapFlags,
                _offset: u64,
                _address: u64,
                _size: u64,
                _fd: Option<File>,
            ) -> Result<(), std::io::Error> {
                Ok(())
            }
            fn dma_unmap(
                &mut self,
                _flags: DmaUnmapFlags,
                _address: u64,
                _size: u64,
            ) -> Result<(), std::io::Error> {
                Ok(())
            }
            fn reset(&mut self) -> Result<(), std::io::Error> {
                Ok(())
            }
            fn set_irqs(
                &mut self,
                _index: u32,
                _flags: u32,
                _start: u32,
                _count: u32,
                _fds: Vec<File>,
            ) -> Result<(), std::io::Error> {
                Ok(())
            }
        }

        fn new_server() -> (Server, PathBuf) {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "vfio-user-test-{}-{}.sock",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let regions = (0..2)
                .map(|index| ServerRegion {
                    region_info: vfio_region_info {
                        argsz: size_of::<vfio_region_info>() as u32,
                        index,
                        size: REGION_SIZE,
                        flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                        ..Default::default()
                    },
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                })
                .collect();
            let irqs = vec![IrqInfo {
                index: 0,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            }];
            (Server::new(&path, true, irqs, regions).unwrap(), path)
        }

        /// A raw client connected to a server that serves it on a thread.
        struct Peer {
            stream: UnixStream,
            server: JoinHandle<(Result<(), Error>, Backend)>,
            next_id: u16,
        }

        impl Peer {
            fn connect() -> Peer {
                Self::connect_to(new_server())
            }

            fn connect_to((server, path): (Server, PathBuf)) -> Peer {
                let stream = UnixStream::connect(&path).unwrap();
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                let server = std::thread::spawn(move || {
                    let mut backend = Backend { writes: Vec::new() };
                    let result = server.run(&mut backend);
                    (result, backend)
                });
                Peer {
                    stream,
                    server,
                    next_id: 0,
                }
            }

            fn header(&mut self, command: u16, message_size: u32) -> Header {
                self.next_id += 1;
                Header {
                    message_id: self.next_id,
                    command,
                    message_size,
                    ..Default::default()
                }
            }

            /// The bytes of a well-framed message.
            fn message(&mut self, command: Command, payload: &[u8]) -> Vec<u8> {
                let size = (size_of::<Header>() + payload.len()) as u32;
                let mut bytes = self.header(command as u16, size).as_slice().to_vec();
                bytes.extend_from_slice(payload);
                bytes
            }

            fn send(&mut self, command: Command, payload: &[u8]) {
                let bytes = self.message(command, payload);
                self.stream.write_all(&bytes).unwrap();
            }

            fn send_with_fds(&mut self, command: Command, payload: &[u8], fds: &[RawFd]) {
                let bytes = self.message(command, payload);
                let sent = self.stream.send_with_fds(&[&bytes[..]], fds).unwrap();
                assert_eq!(sent, bytes.len());
            }

            /// The next reply: its header and the bytes after it.
            fn reply(&mut self) -> (Header, Vec<u8>) {
                let mut header = Header::default();
                self.stream.read_exact(header.as_mut_slice()).unwrap();
                assert_eq!(header.message_id, self.next_id, "reply out of sync");
                let mut rest = vec![0; header.message_size as usize - size_of::<Header>()];
                self.stream.read_exact(&mut rest).unwrap();
                (header, rest)
            }

            /// Expects a successful reply, returning its payload.
            fn ok(&mut self) -> Vec<u8> {
                let (header, rest) = self.reply();
                assert_eq!(header.flags, HeaderFlags::Reply as u32, "{header:?}");
                rest
            }

            /// Expects an error reply, returning its errno.
            fn error(&mut self) -> i32 {
                let (header, rest) = self.reply();
                assert_eq!(
                    header.flags,
                    HeaderFlags::Reply as u32 | HeaderFlags::Error as u32
                );
                assert!(rest.is_empty());
                header.error as i32
            }

            fn version(&mut self) {
                let mut payload = [0u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat();
                payload.extend_from_slice(b"{\"capabilities\":{}}\0");
                self.send(Command::Version, &payload);
                let reply = self.ok();
                assert_eq!(reply.last(), Some(&0));
            }

            /// Closes the connection and returns what `Server::run` returned.
            fn finish(self) -> (Result<(), Error>, Backend) {
                drop(self.stream);
                self.server.join().unwrap()
            }

            /// Waits for `Server::run` to end on its own.
            fn server_result(self) -> Result<(), Error> {
                let (result, _) = self.server.join().unwrap();
                result
            }
        }

        fn region_access(region: u32, offset: u64, count: u32) -> Vec<u8> {
            let mut payload = offset.to_ne_bytes().to_vec();
            payload.extend_from_slice(&region.to_ne_bytes());
            payload.extend_from_slice(&count.to_ne_bytes());
            payload
        }

        fn words(words: &[u32]) -> Vec<u8> {
            words.iter().flat_map(|w| w.to_ne_bytes()).collect()
        }

        fn dma_map(argsz: u32) -> Vec<u8> {
            let mut payload = words(&[argsz, DmaMapFlags::READ_WRITE.bits()]);
            for field in [0u64, 0x1000_0000, 0x1000] {
                payload.extend_from_slice(&field.to_ne_bytes());
            }
            payload
        }

        #[test]
        fn version_without_nul_is_refused_and_the_connection_goes_on() {
            let mut peer = Peer::connect();
            let mut payload = [0u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat();
            payload.extend_from_slice(b"{\"capabilities\":{}}");
            peer.send(Command::Version, &payload);
            assert_eq!(peer.error(), EINVAL);
            peer.version();
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn bad_version_data_is_refused() {
            let mut peer = Peer::connect();
            let version = [0u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat();
            for data in [
                &b"\xff\xfe\0"[..],
                b"not json\0",
                b"{\"capabilities\":{}}\0\0",
                b"{\"capabilities\":{\"max_msg_fds\":-1}}\0",
                b"\0",
            ] {
                peer.send(Command::Version, &[&version[..], data].concat());
                assert_eq!(peer.error(), EINVAL, "{data:?}");
            }
            // Shorter than a VERSION message.
            peer.send(Command::Version, &[1, 2]);
            assert_eq!(peer.error(), EINVAL);
            // No version data at all: the capabilities are optional.
            peer.send(Command::Version, &version);
            peer.ok();
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn size_smaller_than_a_header_ends_the_connection() {
            let mut peer = Peer::connect();
            peer.version();
            let header = peer.header(Command::DeviceReset as u16, 8);
            peer.stream.write_all(header.as_slice()).unwrap();
            assert_eq!(peer.error(), EINVAL);
            assert!(matches!(peer.server_result(), Err(Error::InvalidInput)));
        }

        #[test]
        fn enormous_size_ends_the_connection_without_allocating() {
            let mut peer = Peer::connect();
            peer.version();
            let header = peer.header(Command::RegionWrite as u16, u32::MAX);
            peer.stream.write_all(header.as_slice()).unwrap();
            assert_eq!(peer.error(), EINVAL);
            assert!(matches!(peer.server_result(), Err(Error::InvalidInput)));
        }

        #[test]
        fn half_a_header_then_eof_ends_the_connection() {
            let mut peer = Peer::connect();
            peer.version();
            let header = peer.header(Command::DeviceReset as u16, 16);
            peer.stream.write_all(&header.as_slice()[..8]).unwrap();
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert!(matches!(peer.server_result(), Err(Error::StreamRead(_))));
        }

        #[test]
        fn header_in_pieces_is_reassembled() {
            let mut peer = Peer::connect();
            peer.version();
            let header = peer.header(Command::DeviceReset as u16, 16);
            peer.stream.write_all(&header.as_slice()[..5]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            peer.stream.write_all(&header.as_slice()[5..]).unwrap();
            peer.ok();
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn message_cut_short_ends_the_connection() {
            let mut peer = Peer::connect();
            peer.version();
            let header = peer.header(Command::RegionWrite as u16, 100);
            peer.stream.write_all(header.as_slice()).unwrap();
            peer.stream.write_all(&[0; 10]).unwrap();
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert!(matches!(peer.server_result(), Err(Error::StreamRead(_))));
        }

        #[test]
        fn region_accesses_are_checked_and_bounded() {
            let mut peer = Peer::connect();
            peer.version();
            for (region, offset, count) in [
                (0, 0, u32::MAX),
                (0, 0, MAX_DATA_XFER_SIZE + 1),
                (2, 0, 4),
                (u32::MAX, 0, 4),
                (0, u64::MAX - 1, 4),
            ] {
                peer.send(Command::RegionRead, &region_access(region, offset, count));
                assert_eq!(peer.error(), EINVAL, "{region} {offset} {count}");
            }
            // A write whose count is not the data it carries.
            for data_len in [0, 3, 5] {
                let mut payload = region_access(1, 0, 4);
                payload.extend_from_slice(&vec![7; data_len]);
                peer.send(Command::RegionWrite, &payload);
                assert_eq!(peer.error(), EINVAL, "{data_len}");
            }
            // A write of u32::MAX bytes that carries none.
            peer.send(Command::RegionWrite, &region_access(1, 0, u32::MAX));
            assert_eq!(peer.error(), EINVAL);
            // Shorter than a region access.
            peer.send(Command::RegionRead, &[0; 8]);
            assert_eq!(peer.error(), EINVAL);

            // The largest read and write the server advertises go through.
            peer.send(
                Command::RegionRead,
                &region_access(0, 0, MAX_DATA_XFER_SIZE),
            );
            let reply = peer.ok();
            assert_eq!(reply.len(), 16 + MAX_DATA_XFER_SIZE as usize);
            assert!(reply[16..].iter().all(|b| *b == 0xab));
            let mut payload = region_access(1, 8, MAX_DATA_XFER_SIZE);
            payload.extend_from_slice(&vec![7; MAX_DATA_XFER_SIZE as usize]);
            peer.send(Command::RegionWrite, &payload);
            assert_eq!(peer.ok(), region_access(1, 8, MAX_DATA_XFER_SIZE));

            let (result, backend) = peer.finish();
            assert!(result.is_ok());
            assert_eq!(backend.writes.len(), 1);
            assert_eq!(backend.writes[0].2.len(), MAX_DATA_XFER_SIZE as usize);
        }

        #[test]
        fn info_indexes_and_argsz_are_checked() {
            let mut peer = Peer::connect();
            peer.version();
            let region_info = |argsz: u32, index: u32| words(&[argsz, 0, index, 0, 0, 0, 0, 0]);
            peer.send(Command::DeviceGetRegionInfo, &region_info(32, 2));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::DeviceGetRegionInfo, &region_info(31, 0));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::DeviceGetRegionInfo, &region_info(32, 1));
            peer.ok();
            peer.send(Command::GetIrqInfo, &words(&[16, 0, 1, 0]));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::GetIrqInfo, &words(&[16, 0, u32::MAX, 0]));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::GetIrqInfo, &words(&[0, 0, 0, 0]));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::GetIrqInfo, &words(&[16, 0, 0, 0]));
            peer.ok();
            peer.send(Command::DeviceGetInfo, &words(&[4, 0, 0, 0]));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::DmaMap, &dma_map(8));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::DmaUnmap, &words(&[24, 0]));
            assert_eq!(peer.error(), EINVAL);
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn file_descriptors_are_checked() {
            let null = File::open("/dev/null").unwrap();
            let fd = null.as_raw_fd();
            let mut peer = Peer::connect();
            peer.version();
            // DMA_MAP takes at most one descriptor.
            peer.send_with_fds(Command::DmaMap, &dma_map(32), &[fd, fd]);
            assert_eq!(peer.error(), EINVAL);
            peer.send_with_fds(Command::DmaMap, &dma_map(32), &[fd]);
            peer.ok();
            peer.send(Command::DmaMap, &dma_map(32));
            peer.ok();
            // SET_IRQS: at most one eventfd per interrupt, within the index.
            let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
            peer.send_with_fds(Command::SetIrqs, &words(&[20, trigger, 0, 0, 1]), &[fd, fd]);
            assert_eq!(peer.error(), EINVAL);
            peer.send_with_fds(Command::SetIrqs, &words(&[20, trigger, 0, 1, 1]), &[fd]);
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::SetIrqs, &words(&[20, trigger, 0, u32::MAX, 2]));
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::SetIrqs, &words(&[20, trigger, 1, 0, 1]));
            assert_eq!(peer.error(), EINVAL);
            let none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
            peer.send_with_fds(Command::SetIrqs, &words(&[20, none, 0, 0, 1]), &[fd]);
            assert_eq!(peer.error(), EINVAL);
            peer.send_with_fds(Command::SetIrqs, &words(&[20, trigger, 0, 0, 1]), &[fd]);
            peer.ok();
            peer.send(Command::SetIrqs, &words(&[20, none, 0, 0, 0]));
            peer.ok();
            // Commands that take none.
            peer.send_with_fds(Command::RegionRead, &region_access(0, 0, 4), &[fd]);
            assert_eq!(peer.error(), EINVAL);
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn unknown_commands_are_refused_and_skipped() {
            let mut peer = Peer::connect();
            peer.version();
            for command in [0u16, 6, 11, 14, 15, 0x7777, u16::MAX] {
                let mut bytes = peer.header(command, 24).as_slice().to_vec();
                bytes.extend_from_slice(&[0xff; 8]);
                peer.stream.write_all(&bytes).unwrap();
                assert_eq!(peer.error(), ENOTSUP, "{command}");
            }
            // A reset with trailing bytes, and the stream is still in step.
            peer.send(Command::DeviceReset, &[1, 2, 3]);
            peer.ok();
            peer.send(Command::RegionRead, &region_access(0, 0, 4));
            assert_eq!(peer.ok()[16..], [0xab; 4]);
            assert!(peer.finish().0.is_ok());
        }

        fn connect_with_timeout(timeout: Option<std::time::Duration>) -> Peer {
            let (mut server, path) = new_server();
            server.set_handshake_timeout(timeout);
            Peer::connect_to((server, path))
        }

        #[test]
        fn silent_client_is_dropped_after_the_handshake_timeout() {
            let timeout = std::time::Duration::from_millis(200);
            let start = std::time::Instant::now();
            let peer = connect_with_timeout(Some(timeout));
            assert!(peer.server_result().is_err());
            let took = start.elapsed();
            assert!(took >= timeout && took < timeout * 10, "{took:?}");
        }

        #[test]
        fn trickled_version_cannot_extend_the_handshake() {
            let timeout = std::time::Duration::from_millis(300);
            let start = std::time::Instant::now();
            let mut peer = connect_with_timeout(Some(timeout));
            let mut payload = [0u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat();
            payload.extend_from_slice(b"{\"capabilities\":{}}\0");
            let bytes = peer.message(Command::Version, &payload);
            let mut stream = peer.stream.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                for byte in bytes {
                    if stream.write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
            assert!(peer.server_result().is_err());
            let took = start.elapsed();
            assert!(took >= timeout && took < timeout * 5, "{took:?}");
            writer.join().unwrap();
        }

        #[test]
        fn client_that_never_reads_cannot_extend_the_handshake() {
            let timeout = std::time::Duration::from_millis(500);
            let start = std::time::Instant::now();
            let mut peer = connect_with_timeout(Some(timeout));
            // Commands before VERSION, each refused with a reply nobody reads.
            let bytes: Vec<u8> = (0..100_000)
                .flat_map(|_| peer.message(Command::DeviceReset, &[]))
                .collect();
            let mut stream = peer.stream.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = stream.write_all(&bytes);
            });
            assert!(peer.server_result().is_err());
            let took = start.elapsed();
            assert!(took >= timeout && took < timeout * 10, "{took:?}");
            writer.join().unwrap();
        }

        #[test]
        fn commands_before_version_are_refused() {
            let mut peer = Peer::connect();
            peer.send(Command::DeviceReset, &[]);
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::RegionRead, &region_access(0, 0, 4));
            assert_eq!(peer.error(), EINVAL);
            // A failed VERSION does not complete the exchange.
            peer.send(Command::Version, &[0, 0, 1, 0, b'x']);
            assert_eq!(peer.error(), EINVAL);
            peer.send(Command::DeviceReset, &[]);
            assert_eq!(peer.error(), EINVAL);
            peer.version();
            peer.send(Command::DeviceReset, &[]);
            peer.ok();
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn no_timeout_once_the_handshake_is_done() {
            let timeout = std::time::Duration::from_millis(100);
            let mut peer = connect_with_timeout(Some(timeout));
            peer.version();
            std::thread::sleep(timeout * 4);
            peer.send(Command::RegionRead, &region_access(0, 0, 4));
            assert_eq!(peer.ok()[16..], [0xab; 4]);
            assert!(peer.finish().0.is_ok());
        }

        #[test]
        fn handshake_may_take_for_ever_without_a_timeout() {
            let mut peer = connect_with_timeout(None);
            std::thread::sleep(std::time::Duration::from_millis(100));
            peer.version();
            assert!(peer.finish().0.is_ok());
        }
    }
}
