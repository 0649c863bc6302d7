//! A chunk's delivery progress on disk: which of its events were delivered (or sent to the
//! error stream), so that after a crash a restarted fluentd resends only what was not confirmed.
//!
//! The file sits beside the chunk in the buffer directory. It is replaced atomically (written
//! to `<path>.tmp`, then renamed), so a reader sees the previous or the new version, never half
//! of one. Layout:
//!
//! ```text
//! "KRSPROG1"            8 bytes, format and version
//! id length             1 byte, then the chunk's unique id (fluentd's 16 bytes)
//! bits length           u32 little-endian, then a bit per event (bit i of byte i/8)
//! MD5 of all the above  16 bytes
//! ```
//!
//! There is no fsync: the file guards against a crash of the process (SIGKILL, OOM), as the
//! buffer chunk itself does; after a power loss it may be missing, which means "resend all".

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::delivery::EventBits;

const MAGIC: &[u8; 8] = b"KRSPROG1";

/// Where one chunk's progress is kept, and which chunk it belongs to.
#[derive(Debug, Clone)]
pub struct ProgressFile {
    pub path: PathBuf,
    pub chunk_id: Vec<u8>,
}

/// Why a progress file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("progress file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("progress file {path} is damaged ({what})")]
    Damaged { path: String, what: &'static str },
    #[error("progress file {path} belongs to another chunk")]
    OtherChunk { path: String },
}

impl ProgressFile {
    fn display(&self) -> String {
        self.path.display().to_string()
    }

    fn encode(&self, bits: &EventBits) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(MAGIC.len() + 1 + self.chunk_id.len() + 4 + bits.0.len() + 16);
        out.extend_from_slice(MAGIC);
        out.push(self.chunk_id.len() as u8);
        out.extend_from_slice(&self.chunk_id);
        out.extend_from_slice(&(bits.0.len() as u32).to_le_bytes());
        out.extend_from_slice(&bits.0);
        let digest = Md5::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Replaces the file with `bits`, atomically.
    pub fn write(&self, bits: &EventBits) -> Result<(), ProgressError> {
        let io = |source| ProgressError::Io {
            path: self.display(),
            source,
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.encode(bits)).map_err(io)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io)
    }

    /// The progress recorded for this chunk; `None` if there is no file.
    pub fn read(&self) -> Result<Option<EventBits>, ProgressError> {
        let data = match fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProgressError::Io {
                    path: self.display(),
                    source,
                })
            }
        };
        self.decode(&data).map(Some)
    }

    fn decode(&self, data: &[u8]) -> Result<EventBits, ProgressError> {
        let damaged = |what| ProgressError::Damaged {
            path: self.display(),
            what,
        };
        if data.len() < MAGIC.len() + 1 + 4 + 16 || &data[..MAGIC.len()] != MAGIC {
            return Err(damaged("not a progress file of this version"));
        }
        let (body, digest) = data.split_at(data.len() - 16);
        if Md5::digest(body).as_slice() != digest {
            return Err(damaged("checksum mismatch"));
        }
        let mut at = MAGIC.len();
        let id_len = body[at] as usize;
        at += 1;
        let id = body
            .get(at..at + id_len)
            .ok_or_else(|| damaged("truncated id"))?;
        if id != self.chunk_id.as_slice() {
            return Err(ProgressError::OtherChunk {
                path: self.display(),
            });
        }
        at += id_len;
        let len = body
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| damaged("truncated length"))?;
        at += 4;
        let bits = body
            .get(at..)
            .filter(|b| b.len() == len)
            .ok_or_else(|| damaged("length mismatch"))?;
        Ok(EventBits(bits.to_vec()))
    }

    /// Removes the file (and a leftover temporary one); a missing file is fine.
    pub fn remove(&self) -> Result<(), ProgressError> {
        remove_if_present(&self.path).map_err(|source| ProgressError::Io {
            path: self.display(),
            source,
        })?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let _ = remove_if_present(Path::new(&tmp));
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, id: &[u8]) -> ProgressFile {
        ProgressFile {
            path: dir.join("buffer.p01.log.kprogress"),
            chunk_id: id.to_vec(),
        }
    }

    #[test]
    fn round_trip_replace_and_remove() {
        let dir = std::env::temp_dir().join(format!("kprogress-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = file(&dir, &[7; 16]);
        assert!(f.read().unwrap().is_none());
        let mut bits = EventBits::new(20);
        bits.set(3);
        f.write(&bits).unwrap();
        bits.set(19);
        f.write(&bits).unwrap();
        assert_eq!(f.read().unwrap(), Some(bits.clone()));
        // Another chunk's id is refused, not applied.
        assert!(matches!(
            file(&dir, &[8; 16]).read(),
            Err(ProgressError::OtherChunk { .. })
        ));
        f.remove().unwrap();
        assert!(f.read().unwrap().is_none());
        f.remove().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damage_is_detected() {
        let f = file(Path::new("/nonexistent"), &[1; 16]);
        let mut bits = EventBits::new(64);
        bits.set(10);
        let good = f.encode(&bits);
        assert_eq!(f.decode(&good).unwrap(), bits);
        for i in [0, 9, 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(f.decode(&bad).is_err(), "flipped byte {i}");
        }
        assert!(f.decode(&good[..good.len() - 3]).is_err());
        assert!(f.decode(b"").is_err());
    }
}
