//! The running SHA-256 of a sequential dump, off the writer's path.
//!
//! The guest waits for the session's writer (a slot is free again, a DMA buffer is the
//! guest's again, only once its bytes are in the file), so every cycle the writer spends is
//! the guest's time. Hashing is a third of that work; once a dump's chunks are large it goes to
//! a thread of its own, which hashes a copy of each chunk (a copy costs a fifth of a hash) while
//! the writer goes on. Two buffers travel between them, so memory stays bounded (two chunks)
//! and the writer waits only if the hasher falls two chunks behind.

use sha2::{Digest, Sha256};
use std::io;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Chunks at least this large move the hash to its own thread; smaller ones are hashed in
/// line (a thread per session would cost more than it saves on a dump of small chunks).
pub const PIPE_FROM: usize = 256 << 10;
/// Buffers between the writer and the hasher.
const PIPE_BUFFERS: usize = 2;

/// A SHA-256 fed in order, in line or on its own thread.
#[derive(Debug)]
pub enum RunningHash {
    /// Hashed by the caller.
    Inline(Sha256),
    /// Hashed by a thread of its own.
    Piped(Pipe),
    /// The hash thread died: the digest must come from reading the file back.
    Lost,
}

impl Default for RunningHash {
    fn default() -> Self {
        Self::Inline(Sha256::new())
    }
}

impl RunningHash {
    /// Adds `data`. Moves to a thread once a chunk of [`PIPE_FROM`] bytes or more comes (and
    /// stays in line if no thread can be made).
    pub fn update(&mut self, data: &[u8]) {
        if let Self::Inline(hash) = self {
            if data.len() >= PIPE_FROM {
                match Pipe::start(hash.clone()) {
                    Ok(pipe) => *self = Self::Piped(pipe),
                    Err(e) => log::debug!("hashing in line: no hash thread ({e})"),
                }
            }
        }
        match self {
            Self::Inline(hash) => hash.update(data),
            Self::Piped(pipe) => {
                if !pipe.send(data) {
                    log::warn!("the hash thread is gone: the dump will be hashed from the file");
                    *self = Self::Lost;
                }
            }
            Self::Lost => {}
        }
    }

    /// The digest of everything added, as lowercase hex; `None` if it was lost.
    pub fn finish(self) -> Option<String> {
        let hash = match self {
            Self::Inline(hash) => hash,
            Self::Piped(mut pipe) => pipe.join()?,
            Self::Lost => return None,
        };
        Some(hex::encode(hash.finalize()))
    }
}

/// The hasher thread and the buffers it shares with the writer.
#[derive(Debug)]
pub struct Pipe {
    full: Option<SyncSender<Vec<u8>>>,
    empty: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<Sha256>>,
}

impl Pipe {
    fn start(mut hash: Sha256) -> io::Result<Self> {
        let (full, to_hash) = sync_channel::<Vec<u8>>(PIPE_BUFFERS);
        let (give_back, empty) = sync_channel::<Vec<u8>>(PIPE_BUFFERS);
        for _ in 0..PIPE_BUFFERS {
            let _ = give_back.send(Vec::new());
        }
        let thread = std::thread::Builder::new().name("hash".into()).spawn(move || {
            for buf in to_hash {
                hash.update(&buf);
                // The writer may be gone (dropping its end): nothing to give back then.
                let _ = give_back.send(buf);
            }
            hash
        })?;
        Ok(Self { full: Some(full), empty, thread: Some(thread) })
    }

    /// Hands a copy of `data` to the hasher; waits only while it holds both buffers. False if
    /// the hasher is gone.
    fn send(&mut self, data: &[u8]) -> bool {
        let Ok(mut buf) = self.empty.recv() else { return false };
        buf.clear();
        buf.extend_from_slice(data);
        self.full.as_ref().is_some_and(|full| full.send(buf).is_ok())
    }

    /// Waits for the hasher to hash everything sent, and returns its state.
    fn join(&mut self) -> Option<Sha256> {
        drop(self.full.take());
        self.thread.take()?.join().ok()
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // A dump whose order broke drops its pipe: the thread ends once its channel closes.
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_and_inline_give_the_same_digest_in_any_mix_of_sizes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        let want = hex::encode(Sha256::digest(&data));
        for sizes in [&[100usize, PIPE_FROM, 5, PIPE_FROM * 2, 1][..], &[1 << 20][..], &[7][..]] {
            let mut h = RunningHash::default();
            let mut at = 0;
            let mut i = 0;
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                h.update(&data[at..at + n]);
                at += n;
                i += 1;
            }
            if sizes[0] >= PIPE_FROM {
                assert!(matches!(h, RunningHash::Piped(_)));
            }
            assert_eq!(h.finish().as_deref(), Some(want.as_str()), "{sizes:?}");
        }
    }
}
