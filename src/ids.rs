//! Message ids, as the queue assigns them and the spool stores them: a slot (the low
//! [`SLOT_BITS`] bits) and that slot's generation (the bits above). A slot's generation only
//! grows, and a slot gets a new id only once its message is final (or its reservation was
//! cancelled): of two ids with the same slot, the larger is the newer, and only the newest
//! message of a slot can still be pending.

/// Bits of a message id that name its slot.
pub const SLOT_BITS: u32 = 24;
pub const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// The slot of message `id`.
pub fn slot_of(id: u64) -> u64 {
    id & SLOT_MASK
}

/// The generation of message `id` (0 is never assigned).
pub fn gen_of(id: u64) -> u64 {
    id >> SLOT_BITS
}
