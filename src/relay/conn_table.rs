//! The relay's record of each open client connection, found by its [`ConnId`]: one slab per
//! core indexed by the connection's slot, which the cores keep dense and reuse. A hash map
//! cost about 430 B per idle connection at 10,000 (its table, load-factor slack and the
//! blocks left behind by each doubling); here an entry costs its own size. A lookup with
//! an id that is not ours (another node's, a stale generation, a bogus core) finds nothing
//! and grows nothing: only `insert`, with an id a core gave, adds slots.

use crate::ids::ConnId;
use crate::slab::Slab;

pub struct ConnTable<V> {
    cores: Vec<Slab<Option<(ConnId, V)>>>,
}

impl<V> Default for ConnTable<V> {
    fn default() -> Self {
        ConnTable { cores: Vec::new() }
    }
}

impl<V> ConnTable<V> {
    /// Records `value` for `conn`; returns what that slot held (a connection the relay was
    /// never told had closed, or `conn` itself opened twice).
    pub fn insert(&mut self, conn: ConnId, value: V) -> Option<V> {
        let core = conn.core();
        while self.cores.len() <= core {
            self.cores.push(Slab::default());
        }
        let slots = &mut self.cores[core];
        let slot = conn.slot() as usize;
        while slots.len() <= slot {
            slots.push(None);
        }
        slots[slot].replace((conn, value)).map(|(_, v)| v)
    }

    pub fn get(&self, conn: ConnId) -> Option<&V> {
        match self.cores.get(conn.core())?.get(conn.slot() as usize)? {
            Some((id, v)) if *id == conn => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut V> {
        match self
            .cores
            .get_mut(conn.core())?
            .get_mut(conn.slot() as usize)?
        {
            Some((id, v)) if *id == conn => Some(v),
            _ => None,
        }
    }

    pub fn contains(&self, conn: ConnId) -> bool {
        self.get(conn).is_some()
    }

    pub fn remove(&mut self, conn: ConnId) -> Option<V> {
        let entry = self
            .cores
            .get_mut(conn.core())?
            .get_mut(conn.slot() as usize)?;
        if entry.as_ref().is_some_and(|(id, _)| *id == conn) {
            return entry.take().map(|(_, v)| v);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::ConnTable;
    use crate::ids::ConnId;

    #[test]
    fn entries_are_found_by_their_exact_id_only() {
        let mut t = ConnTable::default();
        let a = ConnId::new(1, 5, 3);
        assert_eq!(t.insert(a, "a"), None);
        assert_eq!(t.get(a), Some(&"a"));
        assert!(t.contains(a));
        // Same slot, another generation or node: not this connection.
        assert_eq!(t.get(ConnId::new(1, 5, 4)), None);
        assert_eq!(t.get(ConnId::on_node(2, 1, 5, 3)), None);
        assert_eq!(t.remove(ConnId::new(1, 5, 4)), None);
        // Ids past what was inserted find nothing and add nothing.
        assert_eq!(t.get(ConnId::new(200, 1 << 20, 0)), None);
        assert_eq!(t.remove(ConnId::new(9, 9, 9)), None);
        assert_eq!(t.cores.len(), 2);
        *t.get_mut(a).unwrap() = "b";
        assert_eq!(t.remove(a), Some("b"));
        assert_eq!(t.get(a), None);
    }

    #[test]
    fn a_reused_slot_replaces_the_old_record() {
        let mut t = ConnTable::default();
        t.insert(ConnId::new(0, 2, 1), 1);
        assert_eq!(t.insert(ConnId::new(0, 2, 2), 2), Some(1));
        assert_eq!(t.get(ConnId::new(0, 2, 1)), None);
        assert_eq!(t.get(ConnId::new(0, 2, 2)), Some(&2));
    }
}
