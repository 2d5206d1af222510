//! The `epoxi` command's subcommands that live outside `main.rs` (the binary only; the
//! library has none of this).

pub mod tokens;
