//! Campaign names, interned per queue as a `u16` each message keeps.
//!
//! Unlike tenants, which are few and long-lived, every mailing is a new campaign: an id is
//! counted by the messages that carry it and goes back to the free list when the last of them
//! leaves. [`CAMPAIGNS_MAX`] bounds the campaigns queued at once, not those ever seen. No I/O.

use std::collections::HashMap;

/// Distinct campaigns one shard's queue holds at once; a message of one more is kept as
/// without a campaign (a `--campaign` operation does not see it). Ids are `u16`, 0 is none.
pub const CAMPAIGNS_MAX: usize = u16::MAX as usize - 1;

#[derive(Debug, Default)]
pub(super) struct Campaigns {
    /// `names[id - 1]`: the name of id, None when free.
    names: Vec<Option<Box<str>>>,
    /// `refs[id - 1]`: messages carrying id.
    refs: Vec<u32>,
    ids: HashMap<Box<str>, u16>,
    free: Vec<u16>,
}

impl Campaigns {
    /// The id of `name` for one more message (0: none, or no room for another campaign).
    pub(super) fn acquire(&mut self, name: Option<&str>) -> u16 {
        let Some(name) = name else { return 0 };
        if let Some(&id) = self.ids.get(name) {
            if let Some(n) = self.refs.get_mut(usize::from(id) - 1) {
                *n += 1;
            }
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.names.len() < CAMPAIGNS_MAX => {
                self.names.push(None);
                self.refs.push(0);
                self.names.len() as u16
            }
            None => return 0,
        };
        let i = usize::from(id) - 1;
        self.names[i] = Some(name.into());
        self.refs[i] = 1;
        self.ids.insert(name.into(), id);
        id
    }

    /// A message carrying `id` left the queue.
    pub(super) fn release(&mut self, id: u16) {
        let Some(i) = usize::from(id).checked_sub(1) else {
            return;
        };
        let Some(n) = self.refs.get_mut(i) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            if let Some(name) = self.names.get_mut(i).and_then(Option::take) {
                self.ids.remove(&name);
                self.free.push(id);
            }
        }
    }

    pub(super) fn name(&self, id: u16) -> Option<&str> {
        let i = usize::from(id).checked_sub(1)?;
        self.names.get(i)?.as_deref()
    }

    /// Campaigns queued now.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_counted_and_reused_once_the_last_message_leaves() {
        let mut c = Campaigns::default();
        assert_eq!(c.acquire(None), 0);
        let spring = c.acquire(Some("spring"));
        assert_eq!(c.acquire(Some("spring")), spring);
        let fall = c.acquire(Some("fall"));
        assert_ne!(spring, fall);
        assert_eq!(
            (c.name(spring), c.name(fall), c.name(0)),
            (Some("spring"), Some("fall"), None)
        );
        c.release(spring);
        assert_eq!(c.name(spring), Some("spring"), "one message still has it");
        c.release(spring);
        assert_eq!((c.name(spring), c.len()), (None, 1));
        let winter = c.acquire(Some("winter"));
        assert_eq!(winter, spring, "the freed id is reused");
        c.release(0);
        c.release(999);
        assert_eq!(c.len(), 2);
    }
}
