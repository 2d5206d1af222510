//! Traffic shaping: how fast, and through which source, mail goes to each destination.
//!
//! - [`rate`]: `N/period` rates and the GCRA that holds them.
//!
//! No I/O here: the core asks and the owners of the shaping keys answer over the mesh.

pub mod credits;
pub mod layers;
pub mod rate;

pub use rate::{Allowance, Gcra, Rate};
