//! Per-connection storage in fixed-size chunks that never move: each core's connection slots
//! and the relay's record of each connection. A `Vec` (or a hash map) would reallocate as
//! connections arrive, copying every entry, and the allocator keeps the old block resident:
//! measured at 10,000 idle connections on one core, a growing `Vec` of slots more than
//! doubled the RSS per connection (2,380 B, against 912 B in chunks).

use std::ops::{Index, IndexMut};

/// Slots per chunk: a chunk is allocated whole when the last one is full.
const CHUNK: usize = 1024;

pub struct Slab<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append a slot; returns its index, which it keeps for the slab's life.
    pub fn push(&mut self, value: T) -> usize {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let chunk = self.chunks.last_mut().expect("pushed above");
        debug_assert!(chunk.len() < CHUNK, "a chunk never grows past its capacity");
        chunk.push(value);
        self.len += 1;
        self.len - 1
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks
            .get(index / CHUNK)
            .and_then(|c| c.get(index % CHUNK))
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.chunks
            .get_mut(index / CHUNK)
            .and_then(|c| c.get_mut(index % CHUNK))
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten()
    }
}

impl<T> Index<usize> for Slab<T> {
    type Output = T;
    fn index(&self, index: usize) -> &T {
        &self.chunks[index / CHUNK][index % CHUNK]
    }
}

impl<T> IndexMut<usize> for Slab<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::{Slab, CHUNK};

    #[test]
    fn slots_keep_their_index_and_never_move_across_chunks() {
        let mut slab = Slab::default();
        for i in 0..CHUNK + 3 {
            assert_eq!(slab.push(i * 10), i);
        }
        let first: *const usize = &slab[0];
        for i in 0..2 * CHUNK {
            slab.push(i);
        }
        assert!(std::ptr::eq(first, &slab[0]), "the first slot did not move");
        assert_eq!(slab.len(), 3 * CHUNK + 3);
        assert_eq!(slab[CHUNK + 2], (CHUNK + 2) * 10);
        *slab.get_mut(CHUNK).unwrap() = 7;
        assert_eq!(slab[CHUNK], 7);
        assert!(slab.get_mut(slab.len()).is_none());
        assert_eq!(slab.iter().count(), slab.len());
        assert_eq!(slab.iter_mut().nth(CHUNK).copied(), Some(7));
        assert!(slab.chunks.iter().all(|c| c.capacity() == CHUNK));
    }
}
