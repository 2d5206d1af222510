//! `epoxi token ...`: the HTTP API's bearer tokens in `http.tokens_file`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token with a role; prints it once (only its hash is stored).
    Add {
        /// The tokens file (`http.tokens_file`).
        #[arg(long)]
        file: PathBuf,
        /// viewer, injector, operator or admin.
        #[arg(long)]
        role: String,
        /// A name for it (in the audit log).
        #[arg(long)]
        name: String,
    },
    /// Print the tokens' names, roles and creation times.
    List {
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove a token by name.
    Remove {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
}

/// `epoxi token ...`.
pub fn token(command: TokenCommand) -> ExitCode {
    use epoxi::http::access::{self, Role};
    let done = match command {
        TokenCommand::Add { file, role, name } => match Role::parse(&role) {
            None => Err(format!(
                "--role {role}: one of viewer, injector, operator, admin"
            )),
            Some(role) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                access::add_token(&file, &name, role, now)
                    .map(|token| println!("{token}"))
                    .map_err(|e| e.to_string())
            }
        },
        TokenCommand::List { file } => access::read_tokens(&file)
            .map(|list| {
                for t in list {
                    println!("{}\t{}\t{}", t.name, t.role.name(), t.created_ms);
                }
            })
            .map_err(|e| e.to_string()),
        TokenCommand::Remove { file, name } => {
            access::remove_token(&file, &name).map_err(|e| e.to_string())
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("epoxi token: {e}");
            ExitCode::FAILURE
        }
    }
}
