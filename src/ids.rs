//! Ids shared by the edge, the relay and the backends' wire: which connection (and so which
//! core, and later which node of a cluster, owns it), which upstream, which route, which topic.
//! They live here, below both `edge` and `relay`, so neither has to import the other to name
//! a connection. Every packed id uses one helper, [`Field`], so the layout is written once.

use std::fmt;
use std::sync::Arc;

/// One bit field of a packed `u64`: `bits` wide, starting at bit `shift`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    shift: u32,
    bits: u32,
}

impl Field {
    pub const fn new(shift: u32, bits: u32) -> Field {
        assert!(bits > 0 && bits < 64 && shift + bits <= 64);
        Field { shift, bits }
    }
    /// The largest value the field holds.
    pub const fn max(self) -> u64 {
        (1u64 << self.bits) - 1
    }
    /// `value`, truncated to the field's width, moved to its place.
    pub const fn put(self, value: u64) -> u64 {
        (value & self.max()) << self.shift
    }
    /// The field's value in `word`.
    pub const fn get(self, word: u64) -> u64 {
        (word >> self.shift) & self.max()
    }
}

/// Slot of a connection on its core (up to 16.7 M per core, above `MAX_CONNECTIONS`).
pub const SLOT: Field = Field::new(0, 24);
/// Generation of the slot: how many times it was reused, wrapping at 2^24.
pub const GENERATION: Field = Field::new(24, 24);
/// The core that owns the connection.
pub const CORE: Field = Field::new(48, 8);
/// The cluster node that owns the connection (0 on a single gateway).
pub const NODE: Field = Field::new(56, 8);

/// Generations wrap within 24 bits.
pub const GENERATION_MASK: u32 = GENERATION.max() as u32;

/// A client connection: `node (8) | core (8) | generation (24) | slot (24)`. Opaque to
/// backends (docs/relay-protocol.md); a reply finds its core without a global map, and a
/// reply to a connection that is gone is never delivered to a newer one in the same slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// A connection of this node (node 0).
    pub fn new(core: u8, slot: u32, generation: u32) -> ConnId {
        ConnId::on_node(0, core, slot, generation)
    }
    pub fn on_node(node: u8, core: u8, slot: u32, generation: u32) -> ConnId {
        ConnId(
            NODE.put(u64::from(node))
                | CORE.put(u64::from(core))
                | GENERATION.put(u64::from(generation))
                | SLOT.put(u64::from(slot)),
        )
    }
    pub fn node(self) -> u8 {
        NODE.get(self.0) as u8
    }
    pub fn core(self) -> usize {
        CORE.get(self.0) as usize
    }
    pub fn slot(self) -> u32 {
        SLOT.get(self.0) as u32
    }
    pub fn generation(self) -> u32 {
        GENERATION.get(self.0) as u32
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
        if self.node() != 0 {
            write!(f, "{}:", self.node())?;
        }
        write!(f, "{}.{}.{}", self.core(), self.slot(), self.generation())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Index of a backend link set (`[[upstreams]]` entry) in the relay's table.
pub type UpstreamId = u16;

/// Index of a route in the route table of the configuration in force.
pub type RouteId = u16;

/// A pub/sub topic name (bounded by the relay's `MAX_TOPIC_BYTES`). Shared, because one
/// publish is queued to every subscriber on every core.
pub type Topic = Arc<str>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let id = ConnId::new(3, 123_456, 0xABCDEF);
        assert_eq!(
            (id.node(), id.core(), id.slot(), id.generation()),
            (0, 3, 123_456, 0xABCDEF)
        );
        assert_eq!(ConnId::from_u64(id.as_u64()), id);
        assert_eq!(id.to_string(), "3.123456.11259375");
        let remote = ConnId::on_node(7, 255, SLOT.max() as u32, 1);
        assert_eq!(
            (
                remote.node(),
                remote.core(),
                remote.slot(),
                remote.generation()
            ),
            (7, 255, SLOT.max() as u32, 1)
        );
        assert_eq!(remote.to_string(), "7:255.16777215.1");
    }

    #[test]
    fn generation_wraps_without_touching_core() {
        let id = ConnId::new(255, SLOT.max() as u32, GENERATION_MASK + 2);
        assert_eq!(
            (id.core(), id.slot(), id.generation()),
            (255, 16_777_215, 1)
        );
        assert_eq!(id.node(), 0);
    }

    #[test]
    fn same_slot_new_generation_is_a_different_connection() {
        assert_ne!(ConnId::new(0, 5, 1), ConnId::new(0, 5, 2));
    }

    #[test]
    fn fields_do_not_overlap_and_fill_the_word() {
        let all = [SLOT, GENERATION, CORE, NODE];
        let mut seen = 0u64;
        for f in all {
            let bits = f.put(u64::MAX);
            assert_eq!(seen & bits, 0, "{f:?} overlaps");
            seen |= bits;
        }
        assert_eq!(seen, u64::MAX);
    }
}
