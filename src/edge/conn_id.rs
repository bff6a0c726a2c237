//! Connection ids: which core owns a connection, which slot on that core, and which
//! generation of the slot, so a reply finds its core without a global map and a reply to a
//! connection that is gone is never delivered to a newer one in the same slot.

use std::fmt;

/// `core (8 bits) | generation (24 bits) | slot (32 bits)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

/// Generations wrap within 24 bits.
pub const GENERATION_MASK: u32 = (1 << 24) - 1;

impl ConnId {
    pub fn new(core: u8, slot: u32, generation: u32) -> ConnId {
        ConnId(
            (u64::from(core) << 56)
                | (u64::from(generation & GENERATION_MASK) << 32)
                | u64::from(slot),
        )
    }
    pub fn core(self) -> usize {
        (self.0 >> 56) as usize
    }
    pub fn slot(self) -> u32 {
        self.0 as u32
    }
    pub fn generation(self) -> u32 {
        ((self.0 >> 32) as u32) & GENERATION_MASK
    }
    pub fn as_u64(self) -> u64 {
        self.0
    }
    pub fn from_u64(v: u64) -> ConnId {
        ConnId(v)
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.core(), self.slot(), self.generation())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let id = ConnId::new(3, 123_456, 0xABCDEF);
        assert_eq!(
            (id.core(), id.slot(), id.generation()),
            (3, 123_456, 0xABCDEF)
        );
        assert_eq!(ConnId::from_u64(id.as_u64()), id);
        assert_eq!(id.to_string(), "3.123456.11259375");
    }

    #[test]
    fn generation_wraps_without_touching_core() {
        let id = ConnId::new(255, u32::MAX, GENERATION_MASK + 2);
        assert_eq!((id.core(), id.slot(), id.generation()), (255, u32::MAX, 1));
    }

    #[test]
    fn same_slot_new_generation_is_a_different_connection() {
        assert_ne!(ConnId::new(0, 5, 1), ConnId::new(0, 5, 2));
    }
}
