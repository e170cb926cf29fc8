//! The frame: a fixed 32-byte header, then the payload.
//!
//! ```text
//! key: u64 | step: u32 | reserved: u32 | fingerprint: u64 | len: u64      (little endian)
//! ```
//! `key` and `step` form the tag a receiver matches on; the fingerprint describes the operation
//! that sent it (op, dtype, count), so a receiver that expects a different operation under the
//! same tag reports a mismatch at once instead of hanging or reading garbage.

/// Header size in bytes.
pub const HEADER_BYTES: usize = 32;

/// Largest payload of one frame. Larger buffers are sent as several segments; a header announcing
/// more is a protocol error (and is never allocated).
pub const MAX_FRAME_BYTES: u64 = 1 << 30;

/// The matching key of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// Operation key (group, sequence number or user tag).
    pub key: u64,
    /// Step within the operation.
    pub step: u32,
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}/{}", self.key, self.step)
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The tag.
    pub tag: Tag,
    /// The sender's operation fingerprint.
    pub fingerprint: u64,
    /// Payload length.
    pub len: u64,
}

impl FrameHeader {
    /// Encodes to bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&self.tag.key.to_le_bytes());
        out[8..12].copy_from_slice(&self.tag.step.to_le_bytes());
        out[16..24].copy_from_slice(&self.fingerprint.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes from bytes; `Err` names what is wrong.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, String> {
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8-byte slice"));
        let reserved = u32::from_le_bytes(bytes[12..16].try_into().expect("4-byte slice"));
        if reserved != 0 {
            return Err(format!(
                "reserved header field is {reserved:#x}, not 0 (not a burnrun data frame)"
            ));
        }
        let header = Self {
            tag: Tag {
                key: u64_at(0),
                step: u32::from_le_bytes(bytes[8..12].try_into().expect("4-byte slice")),
            },
            fingerprint: u64_at(16),
            len: u64_at(24),
        };
        if header.len > MAX_FRAME_BYTES {
            return Err(format!(
                "frame announces {} bytes, more than the limit {MAX_FRAME_BYTES}",
                header.len
            ));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips() {
        let h = FrameHeader {
            tag: Tag {
                key: 0xdead_beef_0042,
                step: 7,
            },
            fingerprint: 99,
            len: 12345,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn an_oversized_or_garbage_header_is_rejected() {
        let mut h = FrameHeader {
            tag: Tag { key: 1, step: 0 },
            fingerprint: 0,
            len: MAX_FRAME_BYTES + 1,
        }
        .encode();
        assert!(FrameHeader::decode(&h).unwrap_err().contains("limit"));
        h[12] = 1;
        assert!(FrameHeader::decode(&h).unwrap_err().contains("reserved"));
    }
}
