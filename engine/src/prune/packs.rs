//! The packs that exist, numbered: sorted by id, so that what prune learns of each pack lives
//! in dense arrays indexed by that number (its *row*), not in hash maps keyed by 32-byte ids.
//! 40 bytes a pack here and a few in each array: at 10^8 chunks (about 400 k packs) 16 MB,
//! where four hash maps and the plan's list by pack took over 100 MB.

use sbk_store::PackId;

/// The packs that exist with their sizes, in id order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Packs {
    list: Vec<(PackId, u64)>,
}

impl Packs {
    /// The packs of a listing, in any order (a pack listed twice counts once).
    pub fn new(mut list: Vec<(PackId, u64)>) -> Packs {
        list.sort_unstable();
        list.dedup_by_key(|(id, _)| *id);
        list.shrink_to_fit();
        Packs { list }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The row of a pack, if it exists.
    pub fn row(&self, id: &PackId) -> Option<usize> {
        self.list.binary_search_by_key(id, |(p, _)| *p).ok()
    }

    /// The pack of a row, and its size.
    pub fn at(&self, row: usize) -> (PackId, u64) {
        self.list[row]
    }

    /// The bytes of them all.
    pub fn bytes(&self) -> u64 {
        self.list.iter().map(|(_, size)| size).sum()
    }
}
