//! The core's side of queue operations (see `admin`): what one shard answers about its own
//! queue, and the holds, directives and rebinds operations leave behind.

use super::Core;
use crate::admin::Op;

impl Core {
    /// Perform operation `op` on this shard's queue and answer with a JSON object (merged with
    /// the other shards' answers by the admin server).
    pub fn admin(&mut self, op: &Op, now_ms: u64) -> serde_json::Value {
        let _ = now_ms;
        serde_json::json!({ "shard": self.shard, "error": format!("`{}` not implemented yet", op.name()) })
    }
}
