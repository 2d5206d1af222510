//! The core behind a `RefCell`, with the performer of its actions: what the glommio adapters
//! share on one shard. [`CoreCell::with`] runs a step of the core and then performs the actions
//! it decided, after releasing the borrow, so performing one may call into the core again.

use std::cell::RefCell;

use super::{Action, Core};

/// Performs the core's actions (spawns connections, writes outcomes...).
pub type Performer = Box<dyn Fn(Vec<Action>)>;

pub struct CoreCell {
    core: RefCell<Core>,
    performer: RefCell<Option<Performer>>,
}

impl CoreCell {
    pub fn new(core: Core) -> CoreCell {
        CoreCell {
            core: RefCell::new(core),
            performer: RefCell::new(None),
        }
    }

    /// Set who performs the actions (the shard driver, once it has built everything).
    pub fn set_performer(&self, performer: Performer) {
        *self.performer.borrow_mut() = Some(performer);
    }

    /// Run `f` on the core, then perform what it decided. Never hold the result of `f` across
    /// an await that could re-enter (it is plain data).
    pub fn with<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let (r, actions) = {
            let mut core = self.core.borrow_mut();
            let r = f(&mut core);
            (r, core.take_actions())
        };
        if !actions.is_empty() {
            if let Some(p) = self.performer.borrow().as_ref() {
                p(actions);
            }
        }
        r
    }

    /// Read the core without running a step.
    pub fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        f(&self.core.borrow())
    }
}

impl crate::spool::LiveIndex for CoreCell {
    fn live(&self, id: u64) -> Option<crate::spool::LiveMessage> {
        self.core.borrow().live(id)
    }
}
